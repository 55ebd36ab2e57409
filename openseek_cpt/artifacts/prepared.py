"""A prepared dataset (the data stage's artifact), read side: splits, manifest, pad id.

`datasets/<name>/` is a `DatasetDict` saved with `save_to_disk` (splits `train`, optionally `eval`;
columns `input_ids`, `seq_lengths`) plus `manifest.json`, which records `pad_token_id`,
`eos_token_id`, `vocab_size`, `max_length` and the mix. Train, evaluation and the exporters read it
only through this module, so the contract has one reader.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from openseek_cpt.artifacts.fileio import load_json
from openseek_cpt.errors import UserError, first_line

MANIFEST = "manifest.json"
# The layout's version, in the manifest's "format" (absent: 1). 2: train rows are stored in the order
# they were packed (each drawn row as many times as drawn), not shuffled: the train stage's sampler
# permutes them every epoch; the eval split stays shuffled. Readers accept every version up to this.
FORMAT = 2


def read_manifest(dataset_dir: str | Path) -> dict[str, Any]:
    """The manifest of a prepared dataset ({} when absent: datasets made elsewhere have none).

    A manifest that is there but damaged is an error: its pad id and vocabulary size would
    otherwise be guessed silently."""
    path = Path(dataset_dir, MANIFEST)
    if not (path.exists() or path.is_symlink()):
        return {}
    manifest = load_json(path)
    if not isinstance(manifest, dict):
        raise UserError(f"{path}: not a JSON object ({type(manifest).__name__}); rerun `openseek-cpt data`")
    return manifest


def is_prepared(dataset_dir: str | Path) -> bool:
    return Path(dataset_dir, "dataset_dict.json").is_file()


def load_split(dataset_dir: str | Path, split: str, field: str) -> Any:
    """One split of a prepared dataset (memory-mapped Arrow); `field` names the recipe key or
    argument that pointed here, for the one-line error."""
    from datasets import Dataset, load_from_disk

    dataset_dir = Path(dataset_dir)
    if not dataset_dir.is_dir():
        raise UserError(
            f"{field}: dataset {str(dataset_dir)!r} does not exist; run `openseek-cpt data` first "
            "or point it at a prepared dataset"
        )
    made = read_manifest(dataset_dir).get("format", 1)
    if not isinstance(made, int) or made > FORMAT:
        raise UserError(
            f"{field}: {dataset_dir} has dataset format {made!r}, newer than this openseek-cpt reads "
            f"(up to {FORMAT}); prepare it again with this version or upgrade openseek-cpt"
        )
    check_arrow_files(dataset_dir, field)
    try:
        data = load_from_disk(str(dataset_dir))
    except (OSError, ValueError) as exc:  # pyarrow's ArrowInvalid is a ValueError, ArrowIOError an OSError
        raise UserError(
            f"{field}: {dataset_dir} is not a prepared dataset ({first_line(exc)}); run `openseek-cpt data`"
        ) from None
    if isinstance(data, Dataset):
        if split != "train":
            raise UserError(f"{field}: {dataset_dir} holds a single split; it has no {split!r} split")
        rows = data
    elif split not in data:
        hint = "; prepare it with data.eval_size > 0" if split == "eval" else ""
        raise UserError(f"{field}: {dataset_dir} has no split {split!r} (has {sorted(data)}){hint}")
    else:
        rows = data[split]
    if "input_ids" not in rows.column_names:
        raise UserError(
            f"{field}: split {split!r} of {dataset_dir} has no input_ids column ({rows.column_names}); "
            "run `openseek-cpt data`"
        )
    return rows


# The end-of-stream marker Arrow's stream writer closes every file with (continuation + length 0).
ARROW_EOS = b"\xff\xff\xff\xff\x00\x00\x00\x00"


def check_arrow_files(dataset_dir: Path, field: str) -> None:
    """Every Arrow file of every split is whole, named when not: present, closed with Arrow's
    end-of-stream marker (a cut at a batch boundary reads as fewer rows otherwise), and each record
    batch's message fits in the file. Memory-mapped, so only the batch headers are read."""
    import pyarrow as pa

    if (dataset_dir / "dataset_dict.json").is_file():
        splits = load_json(dataset_dir / "dataset_dict.json", field=field)
        names = splits.get("splits", []) if isinstance(splits, dict) else []
        folders = [dataset_dir / name for name in names if isinstance(name, str)]
    else:  # one split saved by Dataset.save_to_disk; anything else is load_from_disk's to refuse
        folders = [dataset_dir] if (dataset_dir / "state.json").is_file() else []
    for folder in folders:
        state = load_json(folder / "state.json", field=field) if (folder / "state.json").is_file() else {}
        for entry in state.get("_data_files", []) if isinstance(state, dict) else []:
            path = folder / str(entry.get("filename", "?"))
            if not path.is_file():
                raise UserError(f"{field}: {path} is missing; rerun `openseek-cpt data`")
            try:
                with open(path, "rb") as f:
                    f.seek(max(path.stat().st_size - len(ARROW_EOS), 0))
                    if f.read() != ARROW_EOS:
                        raise ValueError("it does not end with Arrow's end-of-stream marker")
                with pa.memory_map(str(path)) as source:
                    for _ in pa.ipc.open_stream(source):
                        pass
            except (OSError, ValueError, pa.ArrowException) as exc:
                raise UserError(
                    f"{field}: {path} is truncated or damaged ({first_line(exc)}); rerun `openseek-cpt data` "
                    "or restore the dataset"
                ) from None


def pad_token_id(manifest: dict[str, Any], config: Any = None) -> int:
    """The id that pads short rows: the manifest's pad, its eos, then the model config's pad/eos.

    Padding is never scored (labels -100, its own attention segment), so any valid id is correct;
    the order only keeps the files identical to what the tokenizer would pad with.
    """
    candidates = [manifest.get("pad_token_id"), manifest.get("eos_token_id")]
    if config is not None:
        candidates += [getattr(config, "pad_token_id", None), getattr(config, "eos_token_id", None)]
    for value in candidates:
        if isinstance(value, list) and value:
            value = value[0]
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    return 0
