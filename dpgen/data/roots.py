"""Checks for datasets read from ``data.root``: we never download, so say what to put where."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from dpgen.errors import ConfigError


def require_root(cfg: dict[str, Any], what: str, fix: str) -> Path:
    """``data.root`` as an existing directory."""
    root = cfg.get("root")
    if root is None:
        raise ConfigError(
            "data.root",
            None,
            f"{what} is read from a local copy and never downloaded",
            f"set data.root to the folder that holds it ({fix})",
        )
    path = Path(str(root)).expanduser()
    if not path.is_dir():
        raise ConfigError(
            "data.root",
            str(root),
            "is not an existing directory",
            f"{fix}, then set data.root to that folder",
        )
    return path


def require_files(root: Path, what: str, paths: Sequence[Path], expected: str, fix: str) -> None:
    """Fail with one line naming the expected layout when any of ``paths`` is missing."""
    missing = [p for p in paths if not p.exists()]
    if not missing:
        return
    detail = expected
    if len(missing) < len(paths):  # a partial copy: say which files are absent
        names = ", ".join(p.name for p in missing[:3]) + (", ..." if len(missing) > 3 else "")
        detail += f"; missing {names}"
    packed = [p for p in missing if p.with_name(p.name + ".gz").exists()]
    if packed:  # downloaded, never unpacked (MNIST's files come gzipped)
        fix = f"gunzip {packed[0].with_name(packed[0].name + '.gz')}" + (" and the other .gz files" if len(packed) > 1 else "")
    raise ConfigError("data.root", str(root), f"{what} not found (expected {detail})", fix)
