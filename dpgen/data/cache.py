"""On-disk cache of generated data, keyed by a hash of everything that generated it."""

from __future__ import annotations

import hashlib
import json
import logging
import os
import tempfile
from pathlib import Path
from typing import Any

import torch

log = logging.getLogger(__name__)


def config_key(payload: Any) -> str:
    """Short stable hash of a JSON-serialisable description of how data was generated."""
    text = json.dumps(payload, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def load_tensors(path: Path) -> dict[str, Any] | None:
    """The cached object at ``path``, or None when absent or unreadable (then regenerate)."""
    if not path.is_file():
        return None
    try:
        # weights_only: a cache file is data and must never run code when read.
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # a truncated or foreign file is a cache miss, not a crash
        log.warning("ignoring unreadable cache file %s (%s)", path, e)
        return None


def save_atomic(obj: dict[str, Any], path: Path) -> None:
    """Write ``obj`` so that readers see either the old file or the complete new one.

    Two runs of a sweep may build the same entry at once; each writes its own temporary file
    in the target directory (same filesystem) and renames it into place.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(obj, f)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
