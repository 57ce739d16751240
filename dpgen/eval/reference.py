"""Reference numbers from real data: where the metrics stand with no generator in between.

- fidelity of the real training split against the real held-out split (the best FID/KID/
  precision/recall a generator could hope for at this sample size);
- the downstream classifiers trained on the real training split (the accuracy ceiling).

Both read the sensitive data without privacy. They select nothing and are no part of a
released output; they are cached under ``eval.cache_dir`` by a hash of everything they depend
on, so a sweep computes them once.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

from dpgen.data.cache import config_key
from dpgen.io import build_once, write_json

NOTE = ("fidelity_reference (real train vs real held-out) and downstream_accuracy_real (classifiers "
        "trained on the real training split) are non-private reference points computed on the "
        "sensitive data; they are not part of the released output")


def cached_reference(cache_dir: str | Path, kind: str, key: dict[str, Any],
                     compute: Callable[[], dict[str, Any]]) -> dict[str, Any]:
    """``compute()`` once per ``key``; later calls (and concurrent ones, which wait) read the cached JSON."""
    path = Path(cache_dir) / f"reference-{kind}-{config_key(key)}.json"
    build_once(path, "evaluate", f"{kind} reference", lambda: write_json(path, compute()))
    return json.loads(path.read_text())
