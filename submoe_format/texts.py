"""Text files users pass as calibration, evaluation or load-test data: local files or hub datasets.

Shared by the compressor and the load tester (it imports neither, nor torch)."""
from __future__ import annotations

import json
from pathlib import Path

from .errors import SubMoEError

HUB_PREFIX = "hf:"


class DataError(SubMoEError):
    """A data file or dataset name that cannot be used, with what to do about it."""


def domain_name(spec: str) -> str:
    """Name a data source in reports: file stem for files, dataset id (and config, if given) for hub
    datasets, so that two configs of one dataset are two domains."""
    return ":".join(spec[len(HUB_PREFIX):].split(":")[:2]) if spec.startswith(HUB_PREFIX) else Path(spec).stem


def read_texts(spec: str) -> list[str]:
    """Documents from a `.jsonl` file ({"text": ...} per line), a plain text file (blank-line
    separated documents), or `hf:NAME[:CONFIG[:SPLIT]]` for a datasets-library dataset."""
    if spec.startswith(HUB_PREFIX):
        return _read_hub_dataset(spec[len(HUB_PREFIX):])
    path = Path(spec)
    if not path.is_file():
        raise DataError(f"data file {spec} does not exist (pass a .jsonl/.txt file or hf:DATASET[:CONFIG[:SPLIT]])")
    if path.suffix == ".jsonl":
        texts = []
        with path.open(encoding="utf-8") as f:
            for n, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    texts.append(json.loads(line)["text"])
                except (json.JSONDecodeError, KeyError, TypeError) as e:
                    raise DataError(f"{spec}:{n}: expected a JSON object with a 'text' field ({e})") from None
    else:
        texts = path.read_text(encoding="utf-8").split("\n\n")
    texts = [t for t in texts if t.strip()]
    if not texts:
        raise DataError(f"data file {spec} holds no text: calibration and evaluation need non-empty documents")
    return texts


def _read_hub_dataset(name: str) -> list[str]:
    try:
        import datasets
    except ImportError:
        raise DataError("hub datasets need the `datasets` package: pip install datasets") from None
    parts = name.split(":")
    ds = datasets.load_dataset(parts[0], parts[1] if len(parts) > 1 and parts[1] else None,
                               split=parts[2] if len(parts) > 2 else "train")
    return [t for t in ds["text"] if t and t.strip()]
