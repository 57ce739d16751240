"""Validation of a composed config, before any data is loaded or any work starts.

Every check imports only light modules (each room's ``config.py``): a mistyped value is refused
in seconds, not after importing Lightning and diffusers. The one check that builds the model
(for BatchNorm, under DP) comes last.
"""

from __future__ import annotations

import sys
from pathlib import Path

from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, OmegaConf, open_dict, read_write

from dpgen.checks import require_int, require_number
from dpgen.data import describe_data, has_public_data, validate_data_config, validate_public_config
from dpgen.diffusion.config import validate_diffusion_config
from dpgen.distributed import check_devices_present, validate_trainer_config
from dpgen.errors import ConfigError
from dpgen.eval.config import validate_audit_config, validate_eval_config
from dpgen.loggers import validate_logger_config
from dpgen.methods import METHOD_NAMES
from dpgen.methods.config import check_method_config
from dpgen.methods.selection import check_selection_config
from dpgen.models.config import is_latent_model, validate_ldm_config, validate_model_config
from dpgen.overrides import check_appended_keys, dotted_keys, override_key
from dpgen.privacy.config import validate_privacy_config
from dpgen.privacy.guarantee import NON_PRIVATE_STAGES, training_is_private
from dpgen.sampling.config import validate_sampling_config
from dpgen.stages import STAGE_NAMES, run_stages
from dpgen.stages.planning import STAGE_PLANS


def _positive_int(cfg: DictConfig, key: str) -> None:
    """``key`` (dotted) is absent from this method's config, or an integer >= 1 (a bool is not)."""
    if OmegaConf.select(cfg, key) is not None:
        parent, name = key.rsplit(".", 1)
        require_int(OmegaConf.select(cfg, parent), parent, name, minimum=1)


def _check_method_settings(cfg: DictConfig) -> None:
    """Training settings that would otherwise surface mid-run (a string learning rate fails when
    its stage starts, after public pretraining) or waste the budget silently (a learning rate of 0
    spends ε on a model that never moves; guidance with no label dropout extrapolates towards a
    null class the model never learned)."""
    for key in dotted_keys(cfg.method, "method."):
        parent, name = key.rsplit(".", 1)
        node = OmegaConf.select(cfg, parent)
        if name == "lr":
            require_number(node, parent, name, 0, 10, low_open=True, fix=f"set {key}=1e-3 (a rate of 0 trains nothing)")
        elif name == "ema_decay" and node[name] is not None:
            require_number(node, parent, name, 0, 1, high_open=True, fix=f"set {key}=0.99, or null for no EMA")
        elif name == "label_dropout":
            require_number(node, parent, name, 0, 1, high_open=True, fix=f"set {key}=0.1")
        elif name == "hflip" and not isinstance(node[name], bool):
            raise ConfigError(key, node[name], "must be true or false", f"set {key}=false")
    scale = require_number(cfg.sample, "sample", "guidance_scale", 0, 100,
                           fix="set sample.guidance_scale=1.0 (no guidance)")
    if scale != 1.0 and cfg.method.get("label_dropout") == 0:
        raise ConfigError("sample.guidance_scale", scale, "classifier-free guidance needs the unconditional "
                          "model, and method.label_dropout=0 never trains it",
                          "set sample.guidance_scale=1.0, or train with method.label_dropout=0.1")


def _check_dp_model(cfg: DictConfig) -> None:
    """The model DP training would build: the one check that imports the method's module
    (Lightning, diffusers) and builds a network, so it comes last."""
    from dpgen.privacy.strategy import assert_dp_compatible
    from dpgen.stages.training import build_module

    module = build_module(cfg)  # its own errors name their keys; only DP compatibility is the model's
    try:
        assert_dp_compatible(module)
    except ValueError as err:
        raise ConfigError("model", cfg.model.name, str(err).split(". Fix")[0],
                          "use a model with GroupNorm/LayerNorm only") from err


# Where a pixel model's DP training starts (``method.pretrain``), the stages that make it, in
# order, and the stages that start from it (the first of them loads it).
_PRETRAINING_STAGES = {"none": (), "public": ("pretrain_public",),
                       "selection": ("dp_semantic_query", "pretrain_selected")}
_STARTS_FROM_PRETRAINING = ("warmup", "dp_train", "train")


def _check_pretraining(cfg: DictConfig) -> None:
    """A pretraining the run starts from is made by stages that run before it: found missing
    only when the stage that loads it runs, the run would fail after DP stages had spent ε."""
    m = cfg.method
    source = m.get("pretrain", "none")
    if source not in _PRETRAINING_STAGES:
        raise ConfigError("method.pretrain", source, "unknown pretraining", f"use one of {', '.join(_PRETRAINING_STAGES)}")
    if source == "public":
        if not has_public_data(cfg.public):
            raise ConfigError("public", cfg.public.name, "method.pretrain=public pretrains on public data",
                              "select a public set, e.g. public=glyphs, or use method.pretrain=none")
        validate_public_config(cfg.public)
    elif source == "selection":
        check_selection_config(cfg)
    stages = list(m.stages)
    unread = [s for s in ("dp_semantic_query", "pretrain_selected") if s in stages] if source != "selection" else []
    if unread:  # the query would spend ε on a selection nothing loads
        raise ConfigError("method.pretrain", source, f"the stages {unread} select and pretrain on public classes "
                          "that only method.pretrain=selection loads", "use method.pretrain=selection, or drop them")
    first = next((i for i, s in enumerate(stages) if s in _STARTS_FROM_PRETRAINING), None)
    needed = list(_PRETRAINING_STAGES[source])
    if source == "selection" and m.selection == "semantic":
        needed.insert(0, "train_query_classifier")  # the query votes with it
    if first is not None and [s for s in stages[:first] if s in needed] != needed:
        # A selection's stages are refused without it (above): no pretraining is not a way out there.
        alternative = "" if source == "selection" else ", or use method.pretrain=none"
        raise ConfigError("method.stages", stages, f"{stages[first]} starts from method.pretrain={source}, made by "
                          f"{' -> '.join(needed)}, which must run before it",
                          f"put {', '.join(needed)} before {stages[first]}{alternative}")


def check_resume_dir(resume: object) -> None:
    """``+resume=`` names a run: a mistyped path would start a new run there. Checked where a run
    starts (not in :func:`validate_config`: a resumed run's saved config keeps its ``resume``)."""
    if resume is not None and not (Path(str(resume)) / "run_config.yaml").is_file():
        if any((Path(str(resume)) / sign).exists() for sign in (".hydra", "privacy.json")):
            # run_config.yaml is written after the checks and the privacy plan, before any stage:
            # an attempt killed earlier ran no stage, and its directory takes a fresh start (a
            # privacy.json there is read by the new attempt's plan, so nothing recorded is lost).
            raise ConfigError("resume", resume, "holds an attempt that stopped before its first stage (no "
                              "run_config.yaml): there is nothing to resume",
                              f"start afresh in it: drop +resume and pass hydra.run.dir={resume}")
        raise ConfigError("resume", resume, "is not a dpgen run directory (no run_config.yaml): nothing to resume",
                          "pass the directory of the interrupted run, e.g. outputs/<date>/<time>")


def refuse_missing_resume(argv: list[str], program: str) -> None:
    """``+resume=`` of a path that holds no run, refused before Hydra starts: ``hydra.run.dir``
    follows ``resume``, so Hydra would first create the mistyped directory (its log, ``.hydra/``)
    and only then run :func:`check_resume_dir`. The value is parsed as Hydra parses it; whatever
    this cannot judge (an option beside the overrides, a sweep, an interpolation, a parse error)
    is left to the run's own check."""
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from hydra.errors import OverrideParseException

    if any(arg.startswith("-") and arg not in ("-m", "--multirun") for arg in argv):
        return  # --cfg, --help, -cn ...: Hydra may print instead of run, or read other configs
    for arg in argv:
        if not arg.startswith("+") or override_key(arg) != "resume":
            continue
        try:
            override = OverridesParser.create().parse_overrides([arg])[0]
        except OverrideParseException:  # Hydra reports its own parse errors, in its words
            return
        value = None if override.is_sweep_override() else override.value()
        if isinstance(value, str) and "${" not in value:
            try:
                check_resume_dir(value)
            except ConfigError as err:
                sys.exit(f"{program}: {err}")


def _check_launch(cfg: DictConfig, hydra_cfg: DictConfig) -> None:
    """Launch mistakes that would otherwise train in the wrong place: a cluster launcher without
    ``-m`` (Hydra uses launchers for sweeps only, so the run trains here, e.g. on a login node),
    and ``+resume`` beside a ``hydra.run.dir`` elsewhere (a new run that only records ``resume``)."""
    from hydra.types import RunMode

    launcher = str(hydra_cfg.launcher.get("_target_", ""))
    if hydra_cfg.mode == RunMode.RUN and "submitit" in launcher:
        choice = hydra_cfg.runtime.choices.get("hydra/launcher")
        raise ConfigError("hydra/launcher", choice, "a launcher starts the jobs of a sweep (-m) only; without -m "
                          "this run would train here", f"add -m: python -m dpgen -m hydra/launcher={choice} …")
    resume = cfg.get("resume")
    if hydra_cfg.mode == RunMode.MULTIRUN and resume is not None:
        raise ConfigError("resume", resume, "a sweep's jobs run in the sweep's own directories, so each would "
                          "start afresh there", "resume one run at a time, without -m")
    if hydra_cfg.mode == RunMode.RUN and resume is not None and \
            Path(str(resume)).resolve() != Path(hydra_cfg.runtime.output_dir).resolve():
        raise ConfigError("resume", resume, f"names another directory than hydra.run.dir={hydra_cfg.run.dir}, where "
                          "this run would start afresh", "drop the hydra.run.dir override when resuming")


def check_run_start(cfg: DictConfig) -> None:
    """What a run's command line (``python -m dpgen``, ``python -m dpgen.audit``) checks before
    any work: the overrides Hydra applied, the run to resume, the config, and this machine's GPUs."""
    if HydraConfig.initialized():
        hydra_cfg = HydraConfig.get()
        check_appended_keys(cfg, hydra_cfg.overrides.task, hydra_cfg.runtime.choices)
    check_resume_dir(cfg.get("resume"))
    if HydraConfig.initialized():
        _check_launch(cfg, HydraConfig.get())
    validate_config(cfg)
    check_devices_present(cfg.trainer)


def validate_config(cfg: DictConfig) -> None:
    validate_data_config(cfg.data)
    if cfg.data.get("num_classes") is None:
        # Inferred from the data (data=imagefolder's class folders). Every model builder and stage
        # reads data.num_classes, and run_config.yaml keeps the inferred count for resumes.
        with read_write(cfg.data), open_dict(cfg.data):
            cfg.data.num_classes = describe_data(cfg.data).num_classes
    model = OmegaConf.to_container(cfg.model, resolve=True)
    if is_latent_model(model):
        validate_ldm_config(model, cfg.data.image_size)
    else:
        validate_model_config(model, cfg.data.image_size)

    m = cfg.method
    if m.name not in METHOD_NAMES:
        raise ConfigError("method.name", m.name, "unknown method", f"use one of {sorted(METHOD_NAMES)}")
    check_method_config(cfg)
    unknown = [s for s in m.stages if s not in STAGE_NAMES]
    if unknown:
        raise ConfigError("method.stages", list(m.stages), f"unknown stage {unknown[0]!r}",
                          f"use stages from {sorted(STAGE_NAMES)}")
    private = [s for s in m.stages if s in STAGE_PLANS]
    nonprivate = [s for s in m.stages if s in NON_PRIVATE_STAGES]
    if private and nonprivate:
        raise ConfigError("method.stages", list(m.stages),
                          f"mixes DP stages ({', '.join(private)}) with {', '.join(nonprivate)}, which reads the "
                          "sensitive images without clipping or noise, so no output could carry the guarantee",
                          "drop the non-private stage, or use method=nonprivate for a non-private run")
    _check_pretraining(cfg)
    validate_sampling_config(cfg.sampling, is_latent_model(model))
    unknown = [s for s in run_stages(cfg) if s not in STAGE_NAMES]
    if unknown:
        raise ConfigError("sampling.stages", list(cfg.sampling.stages), f"unknown stage {unknown[0]!r}",
                          f"use stages from {sorted(STAGE_NAMES)}")
    for key in ("method.train.steps", "method.train.batch_size", "method.pretrain_public.steps",
                "method.pretrain_public.batch_size", "method.pretrain_autoencoder.steps",
                "method.pretrain_autoencoder.batch_size", "method.pretrain_ldm.steps",
                "method.pretrain_ldm.batch_size", "method.multiplicity", "sample.num_samples",
                "sample.steps", "sample.batch_size", "privacy.max_physical_batch"):
        _positive_int(cfg, key)
    _check_method_settings(cfg)
    seed = cfg.get("seed")
    # Lightning casts a float seed to int and trains; the sample stage's torch.manual_seed then
    # refuses it, after DP training. 2**32 - 1 is numpy's and Lightning's bound.
    if isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed <= 2**32 - 1:
        raise ConfigError("seed", seed, "must be an integer in [0, 2**32 - 1]", "set e.g. seed=0")
    validate_diffusion_config(cfg)
    validate_eval_config(cfg.eval, cfg.sample.num_samples, cfg.data.num_classes)
    validate_audit_config(cfg.audit, cfg.diffusion.num_train_timesteps)
    validate_logger_config(cfg.logger)
    validate_trainer_config(cfg.trainer)
    if training_is_private(cfg):
        validate_privacy_config(cfg.privacy, cfg.trainer.precision)
    if {"dp_train", "dp_finetune"} & set(m.stages):
        _check_dp_model(cfg)
