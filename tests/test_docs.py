"""The docs say what the code does: the generated tables equal their sources, every path they name exists.

docs/recipe.md's key table is the output of `openseek-cpt recipe --markdown`; docs/cluster.md's variable
table is what `make help` lists. On a mismatch the failure message holds the table to paste.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys

from conftest import REPO, clean_make_env

DOCS = REPO / "docs"
PAGES = (
    "recipe",
    "cluster",
    "container",
    "artifacts",
    "data",
    "training",
    "soup",
    "interop",
    "architecture",
    "benchmarks",
)


def between(text: str, name: str) -> str:
    """The text between `<!-- NAME:begin -->` and `<!-- NAME:end -->` lines."""
    begin, end = f"<!-- {name}:begin -->\n", f"<!-- {name}:end -->"
    assert begin in text and end in text, f"the {name} markers are missing"
    return text.split(begin, 1)[1].split(end, 1)[0]


def make_variables() -> list[tuple[str, str, str]]:
    """(name, default as written, meaning) of every variable `make help` lists, in its order."""
    out = subprocess.run(
        ["make", "-s", "-C", str(REPO), "help"],
        capture_output=True,
        text=True,
        env=clean_make_env(dict(os.environ)),
        check=True,
    ).stdout
    rows = re.findall(r"^  ([A-Z_]+)=(.*)\n\s+(.*)$", out.split("variables", 1)[1], re.M)
    assert rows, out
    return [(name, default.strip(), meaning.strip()) for name, default, meaning in rows]


def make_variables_markdown() -> str:
    lines = ["| variable | default | meaning |", "| --- | --- | --- |"]
    for name, default, meaning in make_variables():
        cells = [f"`{name}`", f"`{default}`" if default else "", meaning]
        lines.append("| " + " | ".join(c.replace("|", "\\|") for c in cells) + " |")
    return "\n".join(lines) + "\n"


def test_recipe_key_table_is_the_generated_one():
    generated = subprocess.run(
        [sys.executable, "-m", "openseek_cpt", "recipe", "--markdown"],
        capture_output=True,
        text=True,
        check=True,
        cwd=REPO,
        env={**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])},
    ).stdout
    table = between((DOCS / "recipe.md").read_text(), "recipe-keys")
    assert table == generated, "docs/recipe.md's key table is stale: paste `openseek-cpt recipe --markdown`"


def test_make_variable_table_is_what_make_help_lists():
    expected = make_variables_markdown()
    table = between((DOCS / "cluster.md").read_text(), "make-variables")
    assert table == expected, f"docs/cluster.md's variable table differs from `make help`; paste:\n{expected}"


def test_every_page_exists_and_the_readme_links_each():
    readme = (REPO / "README.md").read_text()
    for page in PAGES:
        assert (DOCS / f"{page}.md").is_file(), page
        assert f"docs/{page}.md" in readme, f"README.md does not link docs/{page}.md"
    assert sorted(p.stem for p in DOCS.glob("*.md")) == sorted(PAGES)


def test_every_repository_path_the_docs_name_exists():
    """`openseek_cpt/...`, `tests/...`, `bench/...` and the like, wherever README.md or docs/ name one."""
    texts = {p.name: p.read_text() for p in [REPO / "README.md", *DOCS.glob("*.md")]}
    roots = "openseek_cpt|tests|bench|recipes|slurm|container|docs|\\.ci"
    missing = []
    for name, text in texts.items():
        for path in re.findall(rf"(?<![\w/.-])((?:{roots})/[\w./-]*\w)", text):
            if not (REPO / path).exists():
                missing.append(f"{name}: {path}")
    assert not missing, "paths named in the docs that do not exist:\n" + "\n".join(missing)
