"""The stage runner: a run is the ordered list of stages in ``method.stages`` (plus the stages
``sampling.stages`` inserts before ``sample``).

Each stage reads what earlier stages wrote into the run directory and writes its own files, so
an interrupted run resumes stage by stage (``stages.json`` lists the finished ones) and, inside
a training stage, from the last checkpoint. The privacy ledger is planned for *all* stages
before the first one runs; a run whose budget cannot be met never starts.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Iterator, Sequence
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any

from filelock import FileLock, Timeout
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, OmegaConf
from torch.utils.data import Dataset

from dpgen.data import build_dataset
from dpgen.distributed import external_world, launch_id, process_rank
from dpgen.errors import ConfigError
from dpgen.io import atomic_write, remove_unfinished_writes, write_json
from dpgen.loggers.run import experiment, log_results
from dpgen.overrides import config_leaves
from dpgen.privacy.guarantee import RETIRED_FLAGS
from dpgen.privacy.ledger import PrivacyLedger
from dpgen.stages import CANARY_RUN_KEY, DDP_STAGES, run_stages, trained_on_canaries
from dpgen.stages.evaluate import check_utility_sizes
from dpgen.stages.planning import plan_privacy
from dpgen.stages.registry import STAGES

log = logging.getLogger("dpgen")

RUN_LOCK = ".dpgen-run.lock"
# Under an external launcher, rank 0 says which launch holds the lock, or that its launch was refused,
# so that the other ranks join only their own rank 0 (launch_id names the launch).
LAUNCH_HOLDING = ".dpgen-launch.json"
LAUNCH_REFUSED = ".dpgen-refused-{}.json"
# How much older than a rank's own start a launch record may be and still be this launch's: ranks
# start and reach the pipeline seconds to minutes apart. An older record is an earlier launch's.
LAUNCH_RECORD_SLACK_S = 600.0


@dataclass
class RunContext:
    """What every stage gets: the config, the run directory, the ledger, the sensitive data."""

    cfg: DictConfig
    run_dir: Path
    ledger: PrivacyLedger | None = None
    wall_s: dict[str, float] = field(default_factory=dict)

    @cached_property
    def train_set(self) -> Dataset:
        return build_dataset(self.cfg.data, "train")

    def held_out_test_set(self) -> Dataset:
        """The held-out real split. Only the final evaluation may call this."""
        return build_dataset(self.cfg.data, "test")

    def path(self, name: str) -> Path:
        return self.run_dir / name

    @property
    def privacy_json(self) -> Path:
        return self.path("privacy.json")


def _load_state(run_dir: Path) -> dict[str, Any]:
    state_file = run_dir / "stages.json"
    if state_file.exists():
        return json.loads(state_file.read_text())
    return {"completed": [], "wall_s": {}}


# Config groups a resume may change while no stage that reads them has finished: they have shaped
# no output yet (a sampling setting that failed after DP training can be corrected without losing
# the trained model). DP-FETA's warm-up previews its model with the sample settings; CPSample's
# classifier is trained before sampling (a sampling=cpsample attempt voided the guarantee in
# privacy.json, and a void stays void). Everything else (the privacy plan, the data, the model,
# training) is fixed by the first attempt.
_CHANGEABLE_UNTIL = {"sample": ("warmup", "sample"), "sampling": ("train_protection_classifier", "sample"),
                     "eval": ("evaluate",), "audit": ("evaluate",)}
# The canary audit (python -m dpgen.audit) trains on the canaries these choose, and never evaluates.
_FIXED_AUDIT = ("audit.canary.count", "audit.canary.kind")
# Where curves go shapes no output: a resume may switch W&B on, or off.
_CHANGEABLE_ALWAYS = ("logger",)
# A refusal lists what most likely explains it first (a sweep re-run into another's directory).
_LISTED_FIRST = ("privacy", "data", "method", "model", "diffusion", "public", "seed")


def _refusal_order(key: str) -> tuple[int, str]:
    group = key.split(".")[0]
    return (_LISTED_FIRST.index(group) if group in _LISTED_FIRST else len(_LISTED_FIRST), key)


def _may_change_on_resume(key: str, completed: Sequence[str]) -> bool:
    group = key.split(".")[0]
    if group in _CHANGEABLE_ALWAYS:
        return True
    if group not in _CHANGEABLE_UNTIL or key.startswith(_FIXED_AUDIT):
        return False
    return not set(_CHANGEABLE_UNTIL[group]) & set(completed)


def _check_resume_config(cfg: DictConfig, run_dir: Path, completed: Sequence[str]) -> None:
    saved = run_dir / "run_config.yaml"
    if not saved.exists():
        return
    before = OmegaConf.to_container(OmegaConf.load(saved), resolve=True)
    now = OmegaConf.to_container(cfg, resolve=True)
    before.pop("resume", None)
    now.pop("resume", None)
    was_audit, is_audit = trained_on_canaries(run_dir, before), bool(now.pop(CANARY_RUN_KEY, False))
    before.pop(CANARY_RUN_KEY, None)  # audits started before the key have none: compared here, not below
    if was_audit != is_audit:
        # Finishing an audit's training as an ordinary run would sample and evaluate a model
        # trained on canaries; "resuming" an ordinary run as an audit would score canaries that
        # were never trained on, and overwrite the run's metrics.json with that audit.
        if was_audit:
            raise ConfigError("resume", str(run_dir), "is a canary audit's run: its model was trained on canaries "
                              "and is never sampled, evaluated or released",
                              f"resume it with python -m dpgen.audit +resume={run_dir} and its original overrides")
        raise ConfigError("resume", str(run_dir), "is an ordinary run, not a canary audit's: an audit trains a "
                          "model of its own, with canaries", "start the audit without +resume")
    for group, key in (flag.split(".") for flag in RETIRED_FLAGS):
        if isinstance(before.get(group), dict):
            before[group].pop(key, None)
    old, new = config_leaves(before), config_leaves(now)
    changed = sorted((k for k in set(old) | set(new) if old.get(k, "<unset>") != new.get(k, "<unset>")),
                     key=_refusal_order)
    refused = [k for k in changed if not _may_change_on_resume(k, completed)]
    if refused:
        listed = "; ".join(f"{k}: {old.get(k, '<unset>')!r} -> {new.get(k, '<unset>')!r}" for k in refused[:6])
        raise ConfigError("resume", str(run_dir), f"this run was started with a different configuration ({listed}"
                          f"{'; …' if len(refused) > 6 else ''})", f"repeat the original overrides (see {saved})")
    if changed:
        log.warning("resume: %s changed (logging, or settings of stages that have not run yet)", ", ".join(changed))


def _wait_for_rank_zero(run_dir: Path, stages: list[str], since: float, poll_s: float = 2.0,
                        file: Path | None = None, launch: str | None = None) -> None:
    """Under an external launcher, ranks > 0 wait here until rank 0 has finished ``stages`` and
    written ``file`` (or failed after ``since``, this attempt's start: older failures were resumed
    from). With ``launch``, rank 0 must also be this launch's: another launch's stages and files
    would otherwise let these ranks join a DP stage that their own rank 0, refused the run
    directory, never starts, and wait there until the process group times out."""
    while True:
        state = _load_state(run_dir)
        if state.get("failed_at", 0.0) >= since:
            raise RuntimeError(f"rank 0 failed ({state['failed']}); see its log")
        holds = launch is None or _launch_record(run_dir / LAUNCH_HOLDING, launch, since)
        if not holds and _launch_record(run_dir / LAUNCH_REFUSED.format(launch), launch, since):
            raise RuntimeError(f"rank 0 of this launch ({launch}) was refused the run directory {run_dir}: "
                               "another dpgen process is running in it; see rank 0's log")
        if holds and set(stages) <= set(state["completed"]) and (file is None or file.exists()):
            return
        time.sleep(poll_s)


def _launch_record(path: Path, launch: str, since: float) -> bool:
    """``path`` names ``launch`` and was written by this launch, not an earlier one of that name."""
    try:
        record = json.loads(path.read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return False
    return record.get("launch") == launch and record.get("at", 0.0) >= since - LAUNCH_RECORD_SLACK_S


def run_pipeline(cfg: DictConfig, run_dir: Path, stages: Sequence[str] | None = None,
                 train_set: Dataset | None = None) -> RunContext:
    """Run (or resume) ``stages`` (default: :func:`dpgen.stages.run_stages`) in ``run_dir``.

    ``train_set`` replaces the configured training split; only the canary audit
    (``python -m dpgen.audit``) passes one, so canaries never enter an ordinary run. When a
    cluster launcher started several ranks (dpgen/distributed.py), rank 0 runs every stage and
    writes every file; the other ranks only join the DP-SGD stages.
    """
    start = time.time()
    rank, launch = process_rank(), launch_id()
    run_dir.mkdir(parents=True, exist_ok=True)
    log.info("run directory: %s%s", run_dir.resolve(), f" (rank {rank})" if rank else "")
    with ExitStack() as held:
        if rank == 0:
            try:
                held.enter_context(only_process_in(run_dir))
            except ConfigError:
                if launch is not None:  # this launch's other ranks stop instead of waiting
                    write_json(run_dir / LAUNCH_REFUSED.format(launch), {"launch": launch, "at": time.time()})
                raise
            # Only in a run's directory (one that got past its plan): hydra.run.dir may name any
            # folder, whose other files are not dpgen's to walk through or delete.
            if (run_dir / "run_config.yaml").is_file() and \
                    (removed := remove_unfinished_writes(run_dir, started_before=start)):
                log.info("removed %d unfinished file writes of an interrupted attempt", removed)
            if launch is not None:  # an earlier launch of this name may have been refused
                (run_dir / LAUNCH_REFUSED.format(launch)).unlink(missing_ok=True)
                write_json(run_dir / LAUNCH_HOLDING, {"launch": launch, "at": time.time()})
        return _run_stages(cfg, run_dir, stages, train_set, start, rank, launch)


@contextmanager
def only_process_in(run_dir: Path) -> Iterator[None]:
    """Refuse a second process in a run directory (a repeated ``+resume``, a requeued job while
    the first still runs, ``dpgen.evaluate`` on a running run): both would spend the budget the
    ledger has left, or write the same files. An OS file lock, released if the holder dies."""
    path = run_dir / RUN_LOCK
    lock = FileLock(path)
    try:
        lock.acquire(timeout=0)
    except Timeout:
        raise ConfigError("run directory", str(run_dir), f"another dpgen process is running in it (it holds {path})",
                          "wait for it to end or stop it, then resume; on a file system without OS locks, "
                          "remove that file once no process runs there") from None
    try:
        yield
    finally:
        lock.release()


def _publish_hydra_record(run_dir: Path) -> None:
    """This attempt's Hydra record also in Hydra's own layout (``.hydra/config.yaml``, ``hydra.yaml``,
    ``overrides.yaml``), for tools that read it there. Each attempt keeps its own in
    ``.hydra/<time>/`` (conf/config.yaml), and only an attempt that passed its checks and its
    privacy plan is published, so a refused one never replaces the record of the run."""
    if not HydraConfig.initialized():
        return
    # select: a config composed outside a Hydra run (a tool's, a test's) has no runtime.output_dir.
    subdir = OmegaConf.select(HydraConfig.get(), "output_subdir", default=None)
    output_dir = OmegaConf.select(HydraConfig.get(), "runtime.output_dir", default=None)
    if not subdir or not output_dir:
        return
    attempt, hydra_dir = Path(output_dir) / subdir, run_dir / ".hydra"
    if attempt.parent.resolve() != hydra_dir.resolve():
        return
    for record in sorted(attempt.glob("*.yaml")):
        atomic_write(hydra_dir / record.name, lambda f, src=record: f.write(src.read_bytes()))


def _run_stages(cfg: DictConfig, run_dir: Path, stages: Sequence[str] | None, train_set: Dataset | None,
                start: float, rank: int, launch: str | None) -> RunContext:
    state = _load_state(run_dir)
    _check_resume_config(cfg, run_dir, state["completed"])
    for key in ("failed", "failed_at"):  # an earlier attempt's failure; this one resumes it
        state.pop(key, None)
    ctx = RunContext(cfg=cfg, run_dir=run_dir, wall_s=state["wall_s"])
    if train_set is not None:
        ctx.train_set = train_set
    try:
        stages = list(run_stages(cfg) if stages is None else stages)
        if "evaluate" in stages and "evaluate" not in state["completed"]:
            check_utility_sizes(ctx)  # needs N: a bad size found by evaluate would come after training
        ctx.ledger = plan_privacy(ctx)
        if rank == 0:  # after the checks and the plan: a run refused there leaves nothing to resume
            atomic_write(run_dir / "run_config.yaml",
                         lambda f: f.write(OmegaConf.to_yaml(cfg, resolve=True).encode()))
            _publish_hydra_record(run_dir)
        with experiment(cfg, run_dir):
            for i, name in enumerate(stages):
                if name in state["completed"]:
                    log.info("stage %s: already complete, skipping", name)
                    continue
                if rank != 0:
                    if name in DDP_STAGES:
                        # A DP stage first in line has no stage to wait for, but needs rank 0's ledger.
                        _wait_for_rank_zero(run_dir, stages[:i], since=start, launch=launch,
                                            file=ctx.privacy_json if ctx.ledger is not None else None)
                        if ctx.ledger is not None:  # rank 0's ledger, with what earlier stages spent
                            ctx.ledger.load_state_dict(json.loads(ctx.privacy_json.read_text()))
                        log.info("stage %s: rank %d joins", name, rank)
                        STAGES[name](ctx)
                    continue
                log.info("stage %s: starting", name)
                t0 = time.time()
                try:
                    STAGES[name](ctx)
                except BaseException:
                    write_json(run_dir / "stages.json", {**state, "failed": name, "failed_at": time.time()})
                    raise
                ctx.wall_s[name] = ctx.wall_s.get(name, 0.0) + time.time() - t0
                state["completed"].append(name)
                state["wall_s"] = ctx.wall_s
                write_json(run_dir / "stages.json", state)
                log.info("stage %s: done in %.1f s", name, time.time() - t0)
            if rank == 0:
                _record_total_wall(ctx)
                log_results(cfg, run_dir)
    except BaseException:
        # Under a launcher, a failure of rank 0 before any stage (planning, W&B) is recorded too:
        # ranks waiting for it would otherwise wait until the job's time limit. A stage's own
        # failure is recorded already; a single process refused before work writes nothing.
        if rank == 0 and external_world() is not None and _load_state(run_dir).get("failed_at", 0.0) < start:
            write_json(run_dir / "stages.json", {**state, "failed": "outside a stage", "failed_at": time.time()})
        raise
    log.info("run finished in %.1f s; results in %s", time.time() - start, run_dir.resolve())
    return ctx


def _record_total_wall(ctx: RunContext) -> None:
    """evaluate writes metrics.json before its own time is known; complete the total here."""
    metrics_file = ctx.path("metrics.json")
    if metrics_file.exists():
        metrics = json.loads(metrics_file.read_text())
        metrics["total_wall_s"] = sum(ctx.wall_s.values())
        write_json(metrics_file, metrics)
