"""One content key for everything identified by what it is, never by its name.

Cache directories (activations, question banks, evaluations), trial ids and weight digests are all
``content_key``: sha256 over the canonical JSON of a document, then over named arrays (name, dtype,
shape, bytes), so two things share a key only if everything that changes their numbers is the same.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np


def _array_bytes(value: Any) -> tuple[str, tuple[int, ...], bytes]:
    """(dtype, shape, raw bytes) of a numpy array or a torch tensor (any dtype, bf16 included)."""
    if hasattr(value, "detach"):  # a torch tensor: numpy cannot hold bfloat16, so hash its raw bytes
        import torch

        t = value.detach().cpu().contiguous()
        raw = t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b""
        return str(t.dtype).replace("torch.", ""), tuple(t.shape), raw
    a = np.ascontiguousarray(value)
    return str(a.dtype), tuple(a.shape), a.tobytes()


def content_key(doc: Any, arrays: Mapping[str, Any] | None = None, length: int | None = 20) -> str:
    """Hex sha256 of ``doc`` (JSON, sorted keys) and of ``arrays``; ``length`` characters (None: all 64)."""
    h = hashlib.sha256(json.dumps(doc, sort_keys=True, default=str).encode())
    for name in sorted(arrays or {}):
        dtype, shape, raw = _array_bytes(arrays[name])
        h.update(name.encode())
        h.update(dtype.encode())
        h.update(str(shape).encode())
        h.update(raw)
    digest = h.hexdigest()
    return digest if length is None else digest[:length]


def file_sha256(path: str | Path) -> str:
    """Hex sha256 of a file's bytes, read in 4 MiB blocks."""
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 22), b""):
            h.update(block)
    return h.hexdigest()
