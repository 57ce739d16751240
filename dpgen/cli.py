"""What dpgen's command-line tools share outside Hydra (``dpgen.release``, ``dpgen.sampling``, …)."""

from __future__ import annotations

import logging


def log_info_to_stderr() -> None:
    """dpgen's INFO lines on stderr. Opacus calls ``logging.basicConfig`` when it is imported,
    which makes a later ``basicConfig(level=INFO)`` do nothing and leaves the root logger at
    WARNING, so every progress line of a tool that imported it first was dropped. The level is
    therefore set on dpgen's own logger, whichever handler the root logger got first."""
    logging.basicConfig(format="%(message)s")
    logging.getLogger("dpgen").setLevel(logging.INFO)
