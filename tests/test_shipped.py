"""Shipped files (recipes, Accelerate configs) are found from the checkout or $OPENSEEK_CPT_HOME,
whatever the working directory: in the image the package lives in site-packages."""

from __future__ import annotations

from openseek_cpt import shipped


def test_a_shipped_file_is_found_under_openseek_cpt_home_before_the_checkout(tmp_path, monkeypatch):
    config = tmp_path / "recipes" / "accelerate_configs" / "ddp.yaml"
    config.parent.mkdir(parents=True)
    config.write_text("distributed_type: MULTI_GPU\n")
    monkeypatch.setenv("OPENSEEK_CPT_HOME", str(tmp_path))
    monkeypatch.setattr(shipped, "CHECKOUT", tmp_path / "site-packages")  # as installed in the image
    monkeypatch.chdir(tmp_path / "recipes")
    assert shipped.find_shipped("recipes/accelerate_configs/ddp.yaml") == config
    assert shipped.find_shipped("recipes/none.yaml") is None


def test_without_openseek_cpt_home_the_checkout_is_searched(monkeypatch):
    monkeypatch.delenv("OPENSEEK_CPT_HOME", raising=False)
    found = shipped.find_shipped("recipes/tiny/config.yaml")
    assert found == shipped.CHECKOUT / "recipes" / "tiny" / "config.yaml"
