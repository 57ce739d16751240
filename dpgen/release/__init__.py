"""``python -m dpgen.release``: a finished run -> a synthetic dataset of any size + a data card.

Sampling the trained generator is post-processing, so a release of any size carries the run's
guarantee, which ``datacard.json`` / ``DATACARD.md`` state beside the data.
"""

from typing import Any

from dpgen.release.shards import FORMATS, ReleaseSpec, class_counts, release_labels, shard_seed
from dpgen.release.source import ReleaseError, SourceRun, open_run

__all__ = ["FORMATS", "ReleaseError", "ReleaseSpec", "SourceRun", "class_counts", "make_release", "open_run",
           "release_labels", "sample_shard", "shard_seed"]


def __getattr__(name: str) -> Any:
    # Sampling needs the generator's libraries (Lightning, diffusers); a refusal of the
    # command line, or reading a data card, should not wait for them.
    if name in ("make_release", "sample_shard"):
        from dpgen.release import make

        return getattr(make, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
