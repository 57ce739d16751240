"""On-disk cache of generated data, keyed by a hash of everything that generated it."""

from __future__ import annotations

import hashlib
import json
import logging
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

