"""Data sets named by a hub id or by a local copy in the hub's own layout: one ``datasets`` call for both.

Every data set the real profile reads (the forget and retain corpora, the WMDP and MMLU question sets)
is a ``source``: a hub id (``cais/wmdp``), a local folder holding the hub repository's files (its
``README.md`` config table and data files, as ``huggingface-cli download --repo-type dataset`` leaves
them), or, for corpora shipped as one file (the WMDP bio forget corpus is handed out as JSONL), that
file. ``datasets.load_dataset(source, config, split=...)`` reads hub ids and folders alike, so a local
copy exercises the same loader, config names and schema as the hub.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from hsae.keys import file_sha256

FILE_BUILDERS = {".jsonl": "json", ".json": "json", ".parquet": "parquet", ".csv": "csv"}


class DatasetNotFoundError(FileNotFoundError):
    pass


def load_hub_dataset(source: str, config: str | None, split: str, option: str) -> Any:
    """``split`` of ``source`` (hub id, local hub-layout folder or single data file) as a ``datasets.Dataset``.

    ``option`` names the setting that chose ``source``, so the error can say how to point it elsewhere.
    """
    import datasets

    path = Path(source)
    try:
        if path.is_file():
            builder = FILE_BUILDERS.get(path.suffix)
            if builder is None:
                raise DatasetNotFoundError(f"{option}: {source!r} is a file of unknown type; valid: "
                                           f"{sorted(FILE_BUILDERS)} or a folder in the hub's layout")
            return datasets.load_dataset(builder, data_files=str(path), split="train")
        return datasets.load_dataset(source, config, split=split)
    except DatasetNotFoundError:
        raise
    except Exception as exc:  # offline, gated, missing config: datasets raises several kinds
        where = "local folder" if path.is_dir() else "hub data set"
        raise DatasetNotFoundError(
            f"{option}: cannot read {where} {source!r} (config {config!r}, split {split!r}): "
            f"{exc.__class__.__name__}: {str(exc)[:300]}. Download it on a machine with network access "
            f"(huggingface-cli download --repo-type dataset {source} --local-dir DIR) and pass {option} DIR"
        ) from exc


def dataset_identity(source: str, config: str | None = None) -> dict[str, Any]:
    """What cache keys need to know about a data set: its content where it is local, its name otherwise."""
    from hsae.models import folder_digest

    path = Path(source)
    ident: dict[str, Any] = {"source": source if not path.exists() else path.name, "config": config}
    if path.is_file():
        ident["sha256"] = file_sha256(path)[:16]
    elif path.is_dir():
        ident["files"] = folder_digest(path)
    return ident
