"""The check at the start of a local sweep: every job's config composed and validated first.

``python -m dpgen -m privacy.eps=1,abc`` would otherwise train job 0 for its whole run before
job 1 found that ``abc`` is no number. Only sweeps whose jobs run here (Hydra's basic sweeper
and launcher) are checked: a cluster launcher's jobs may see data roots and GPUs that the
submitting machine does not, and each job still validates itself when it starts. Under a
cluster launcher the one check is that the jobs' process geometry does not vary.
"""

from __future__ import annotations

import logging
import sys
from typing import Any

from hydra import compose
from hydra.core.hydra_config import HydraConfig
from hydra.experimental.callback import Callback
from omegaconf import DictConfig

log = logging.getLogger("dpgen")


def sweep_jobs(task_overrides: list[str]) -> tuple[list[list[str]], set[str]]:
    """Each job's overrides, as Hydra's basic sweeper will run them, and the keys that vary
    (without ``+``/``++``/``~``, as :func:`dpgen.overrides.override_key` names them)."""
    from hydra._internal.core_plugins.basic_sweeper import BasicSweeper
    from hydra.core.override_parser.overrides_parser import OverridesParser

    from dpgen.overrides import override_key

    parsed = OverridesParser.create().parse_overrides(task_overrides)
    swept = {override_key(o.get_key_element()) for o in parsed if o.is_sweep_override()}
    return [job for batch in BasicSweeper.split_arguments(parsed, None) for job in batch], swept


# What sets a job's process geometry; a cluster launcher resolves its tasks_per_node, nodes and
# gpus_per_node (${trainer.devices}, ${trainer.num_nodes}, ${trainer.accelerator}) once, from the
# sweep's own config.
_GEOMETRY = ("trainer", "trainer.devices", "trainer.num_nodes", "trainer.accelerator")


class SweepCheck(Callback):
    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        h = config.hydra
        if "submitit" in h.launcher.get("_target_", ""):
            _, swept = sweep_jobs(list(h.overrides.task))
            if varied := sorted(swept & set(_GEOMETRY)):
                sys.exit(f"dpgen: {', '.join(varied)} varies across the sweep, but the launcher starts every job "
                         "with the processes of the first composition (hydra.launcher.tasks_per_node and nodes "
                         "are resolved once), so the other jobs would be refused. Fix: one sweep per job "
                         "geometry. No job was started.")
        if not (h.sweeper.get("_target_", "").endswith("BasicSweeper")
                and h.launcher.get("_target_", "").endswith("BasicLauncher")) or h.sweeper.get("params"):
            return  # (values from hydra.sweeper.params: the jobs are not the command line's alone)
        from dpgen.config import validate_config
        from dpgen.errors import ConfigError
        from dpgen.overrides import check_appended_keys, override_key

        jobs, swept = sweep_jobs(list(h.overrides.task))
        saved = HydraConfig.instance().cfg  # the sweep's own, put back for the jobs' launch
        try:
            for num, job in enumerate(jobs):
                cfg = compose(config_name=h.job.config_name, overrides=job, return_hydra_config=True)
                HydraConfig.instance().set_config(cfg)  # ${hydra:runtime.cwd} in paths resolves as in the job
                try:
                    check_appended_keys(cfg, job, cfg.hydra.runtime.choices)
                    validate_config(cfg)
                except ConfigError as err:
                    values = " ".join(o for o in job if override_key(o) in swept)
                    ended = str(err).endswith((".", "?"))  # "Fix: did you mean privacy.eps=...?"
                    sys.exit(f"dpgen: sweep job {num} ({values}): {err}{'' if ended else '.'} No job was started.")
        finally:
            HydraConfig.instance().cfg = saved
        log.info("sweep: the configs of all %d jobs are valid", len(jobs))
