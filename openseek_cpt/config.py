"""The recipe of a run: the stages' sections assembled (assets, data, train, soup) and the seed.

Each section is declared by its stage, beside the code that uses it (`download.AssetsConfig`,
`data/config.py`, `train/config.py`, `soup/config.py`); `recipe/` holds what every recipe has in
common (loading, `--set`, checks, the hash, the key tables). A stage never sees this object: the CLI
hands each stage its own section, the run record and what it takes from the other sections
(`stage_args`), so this is the one place that reads across sections. Relative paths stay relative:
they resolve against the current directory, as in the original scripts.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from openseek_cpt.data.config import DataConfig
from openseek_cpt.download import AssetsConfig
from openseek_cpt.recipe import loader
from openseek_cpt.recipe.schema import RunRecord, recipe_hash, setting
from openseek_cpt.soup.config import SoupConfig
from openseek_cpt.train.config import TrainConfig


@dataclass
class Recipe:
    seed: int = setting(
        233, "Seed of everything random: sampling, shuffling, initialisation, data order.", at_least=0
    )
    assets: AssetsConfig = setting(AssetsConfig, "Base model + tokenizer (`openseek-cpt download`).")
    data: DataConfig = setting(
        DataConfig, "The mix, tokenization, packing and sampling (`openseek-cpt data`)."
    )
    train: TrainConfig = setting(TrainConfig, "Continued pretraining (`openseek-cpt launch` / `train`).")
    soup: SoupConfig = setting(SoupConfig, "Weight averaging of base + checkpoints (`openseek-cpt soup`).")

    def to_dict(self) -> dict[str, Any]:
        """The recipe as plain data (what is hashed and recorded in provenance)."""
        return dataclasses.asdict(self)

    def hash(self) -> str:
        """sha256 of the canonical JSON of the recipe: identifies the run's settings."""
        return recipe_hash(self)

    def check(self) -> None:
        """Each section's checks across its keys; train's last (it imports transformers)."""
        self.data.check()
        self.soup.check()
        self.train.check()

    def record(self) -> RunRecord:
        """What every stage takes from the whole recipe: the seed, and the recipe for provenance."""
        return RunRecord(seed=self.seed, recipe_hash=self.hash(), settings=self.to_dict())

    # Defaults that point at another section, resolved in one place.
    @property
    def tokenizer_dir(self) -> str:
        return self.data.tokenizer_dir or self.assets.model_dir

    @property
    def train_dataset_dir(self) -> str:
        return self.train.dataset_dir or self.data.output_dir

    @property
    def train_model_dir(self) -> str:
        return self.train.model_dir or self.assets.model_dir

    @property
    def soup_base_dir(self) -> str:
        return self.soup.base_dir or self.assets.model_dir

    @property
    def soup_eval_dataset_dir(self) -> str:
        return self.soup.eval_dataset_dir or self.data.output_dir

    def stage_args(self, stage: str) -> dict[str, Any]:
        """Keyword arguments of `stage`'s `run`: its section, the run record, and what it takes from
        the other sections (resolved paths, how the saved model and tokenizer load)."""
        a = self.assets
        sections: dict[str, dict[str, Any]] = {
            "download": {"assets": a},
            "data": {
                "data": self.data,
                "tokenizer_dir": self.tokenizer_dir,
                "model_dir": a.model_dir,
                "trust_remote_code": a.tokenizer_trust_remote_code,
            },
            "train": {
                "train": self.train,
                "dataset_dir": self.train_dataset_dir,
                "model_dir": self.train_model_dir,
                "model_trust_remote_code": a.model_trust_remote_code,
                "tokenizer_trust_remote_code": a.tokenizer_trust_remote_code,
            },
            "soup": {
                "soup": self.soup,
                "base_dir": self.soup_base_dir,
                "eval_dataset_dir": self.soup_eval_dataset_dir,
                "trust_remote_code": a.model_trust_remote_code,
            },
        }
        return {**sections[stage], "record": self.record()}


def load_recipe(path: str | Path | None, overrides: Sequence[str] = ()) -> Recipe:
    """Read a recipe YAML (or the defaults when path is None), apply KEY=VALUE overrides, validate."""
    return loader.load(Recipe, path, overrides)
