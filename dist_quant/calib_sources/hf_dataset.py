"""A Hugging Face ``datasets`` dataset on disk: a ``save_to_disk`` folder (a Dataset, or a
DatasetDict whose ``train`` split — or only split — is used), a ``.parquet`` / ``.arrow``
file, or a folder of ``.parquet`` files. Nothing is downloaded and no cache is written.

Samples: the dataset in the order of ``torch.randperm(len, generator=manual_seed(seed))``
(the run's ``seed``: the same draw on every rank, whatever ``datasets``' version), the
first ``calib.num_samples`` non-empty records of column ``calib.text_field``. A string
column is tokenized like JSONL text; a column of chat messages is rendered like chat records.
"""
from __future__ import annotations

from pathlib import Path

import torch

from ..calibration import CalibrationSet
from .base import Context, pack, register
from .chat import tokenize_conversations


def import_datasets(ctx: Context):
    try:
        import datasets
    except ImportError:
        raise ctx.error("calib.format=dataset needs the 'datasets' package (pip install datasets)") from None
    return datasets


def open_dataset(ctx: Context):
    path = ctx.path
    saved = path.is_dir() and ((path / "dataset_info.json").is_file() or (path / "dataset_dict.json").is_file())
    files = sorted(path.glob("*.parquet")) if path.is_dir() and not saved else [path]
    if not path.exists():
        raise ctx.error("not found")
    if path.is_dir() and not saved and not files:
        raise ctx.error("is a folder with neither a save_to_disk dataset (dataset_info.json, "
                        "dataset_dict.json) nor .parquet files")
    if path.is_file() and path.suffix not in (".parquet", ".arrow"):
        raise ctx.error("calib.format=dataset expects a save_to_disk folder, a .parquet or an .arrow file")
    if saved and _no_shards(path):  # datasets itself cannot open a saved dataset of 0 records
        raise ctx.error("the dataset is empty (0 records)")
    datasets = import_datasets(ctx)
    try:
        if saved:
            ds = datasets.load_from_disk(str(path), keep_in_memory=False)
        elif path.suffix == ".arrow":
            ds = datasets.Dataset.from_file(str(path))
        else:
            ds = _parquet(datasets, files)
    except (OSError, ValueError, KeyError, IndexError) as exc:  # pyarrow's ArrowInvalid is a ValueError
        raise ctx.error(f"cannot be read as a dataset ({type(exc).__name__}: {str(exc).splitlines()[0]})") from None
    if isinstance(ds, datasets.DatasetDict):
        splits = list(ds)
        if "train" not in ds and len(splits) != 1:
            raise ctx.error(f"is a DatasetDict without a 'train' split (splits: {', '.join(splits)})")
        ds = ds["train"] if "train" in ds else ds[splits[0]]
    return ds


def _no_shards(path: Path) -> bool:
    import json

    try:
        return json.loads((path / "state.json").read_text()).get("_data_files") == []
    except (OSError, ValueError, AttributeError):
        return False


def _parquet(datasets, files: list[Path]):
    import pyarrow.parquet as pq
    import pyarrow as pa

    table = pa.concat_tables([pq.read_table(str(f)) for f in files])
    return datasets.Dataset(datasets.table.InMemoryTable(table))


def draw_order(n: int, seed: int) -> torch.Tensor:
    """The seed-fixed shuffle of ``n`` records (documented; tests recompute it)."""
    return torch.randperm(n, generator=torch.Generator().manual_seed(seed))


@register("dataset", needs_tokenizer=True, doc="a Hugging Face datasets dataset saved to disk (save_to_disk "
          "folder, .parquet or .arrow), column calib.text_field (text or chat messages), seed-fixed shuffle")
def read_dataset(ctx: Context) -> CalibrationSet:
    ds = open_dataset(ctx)
    field = ctx.cfg.text_field
    if len(ds) == 0:
        raise ctx.error("the dataset is empty (0 records)")
    if field not in ds.column_names:
        raise ctx.error(f"has no column {field!r} (calib.text_field; columns: {', '.join(ds.column_names)})")
    column = ds.select_columns([field])
    order = draw_order(len(ds), ctx.seed)

    def values():
        for start in range(0, len(order), 256):  # read in blocks, stop once enough are drawn
            idx = order[start:start + 256].tolist()
            for i, v in zip(idx, column.select(idx)[field]):
                yield i, v

    first = next(values())[1]
    if isinstance(first, list):  # chat messages
        return tokenize_conversations(ctx, ((f"record {i}", v) for i, v in values()))
    samples = []
    for i, v in values():
        if not isinstance(v, str):
            raise ctx.error(f"record {i}: column {field!r} holds {type(v).__name__}, expected text or "
                            "chat messages")
        if v.strip():
            samples.append(ctx.tokenizer(v, add_special_tokens=True)["input_ids"])
        if len(samples) == ctx.num_samples:
            break
    return pack(ctx, samples)
