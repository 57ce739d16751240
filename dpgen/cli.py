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


def device_problem(device: str) -> str | None:
    """Why the tools cannot run their networks on ``device`` here, or None where they can.
    Torch says so only when the first module moves there, after a tool has begun its work and
    its output; and as a traceback. cpu and cuda only, as ``bench.device`` in dpgen/bench.py."""
    import torch  # only the tools that take a device pay for it

    try:
        parsed = torch.device(device)
    except (RuntimeError, TypeError):
        return "not a device"
    if parsed.type == "cpu":
        return None
    if parsed.type != "cuda":
        return f"device type {parsed.type} is not supported"
    if not torch.cuda.is_available():
        return "no CUDA device is visible"
    if parsed.index is not None and parsed.index >= torch.cuda.device_count():
        return f"no CUDA device {parsed.index} ({torch.cuda.device_count()} visible)"
    return None
