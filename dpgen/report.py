"""``python -m dpgen.report <run or multirun dir>``: a sweep's table and plots.

Collects ``metrics.json`` and ``privacy.json`` of every finished run below the directory into
``report.csv`` and ``report.md`` and draws ``accuracy_vs_epsilon.png`` and
``fid_vs_epsilon.png`` there; canary audits (``python -m dpgen.audit``) below it also go to
``audits.csv``. A Hydra multirun calls it on its sweep directory when it ends
(:class:`SweepReport`, configured under ``hydra.callbacks`` in ``conf/config.yaml``).
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path
from typing import Any

from filelock import FileLock, Timeout
from hydra.core.utils import JobReturn
from hydra.experimental.callback import Callback
from hydra.types import RunMode
from omegaconf import DictConfig

from dpgen.eval.report import ReportError, write_report

log = logging.getLogger("dpgen")

REPORT_LOCK_TIMEOUT_S = 600.0  # writing a report takes seconds


class SweepReport(Callback):
    """The sweep's report, rewritten as each job ends: Hydra ends a sweep with a failed job
    without calling ``on_multirun_end``, and the finished runs still deserve their report."""

    def on_job_end(self, config: DictConfig, job_return: JobReturn, **kwargs: Any) -> None:
        if config.hydra.mode == RunMode.MULTIRUN:
            sweep = Path(config.hydra.sweep.dir)
            # Jobs of a parallel launcher end side by side: a job that scanned the sweep before
            # another finished must not write its older view after that one's. Scan and write
            # under one lock, so the last job to end writes a report of every finished job.
            try:
                with FileLock(sweep / ".report.lock", timeout=REPORT_LOCK_TIMEOUT_S):
                    write_report(sweep)
            except ReportError as err:  # no job has finished yet
                log.info("report: %s", err)
            except Timeout:  # a job killed while writing, on a file system without OS locks
                log.warning("report: %s stayed locked; this job leaves the report to the others",
                            sweep / ".report.lock")

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        try:
            write_report(Path(config.hydra.sweep.dir))
        except ReportError as err:  # e.g. every job failed: the jobs' own errors say why
            log.warning("report: %s", err)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m dpgen.report", description=__doc__.splitlines()[0])
    parser.add_argument("directory", type=Path, help="a run directory or a multirun (sweep) directory")
    args = parser.parse_args(argv)
    try:
        paths = write_report(args.directory)
    except ReportError as err:
        sys.exit(f"dpgen.report: {err}")
    print("\n".join(str(p) for p in paths))


if __name__ == "__main__":
    main()
