"""A finished run -> a synthetic dataset of any size, sharded, resumable, with its data card.

Order: every refusal (the run, the request, the output directory) comes before anything is
written. Then the manifest, then the shards not yet done, then the data card; the manifest
marks the release complete last.
"""

from __future__ import annotations

import json
import logging
import shutil
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf
from tqdm.auto import tqdm

from dpgen.data import build_dataset, describe_data
from dpgen.diffusion.config import run_solver
from dpgen.diffusion.sampling import EpsCorrection
from dpgen.io import sha256_file, write_json
from dpgen.methods.base import DiffusionModule
from dpgen.release.datacard import build_datacard, write_datacard
from dpgen.release.shards import (
    MANIFEST,
    ReleaseSpec,
    class_counts,
    class_folders,
    npz_name,
    release_labels,
    remove_partial_files,
    shard_seed,
    write_imagefolder_shard,
    write_npz_shard,
)
from dpgen.release.source import ReleaseError, SourceRun, open_run
from dpgen.stages.protection import CLASSIFIER_FILE, load_protection_guidance
from dpgen.stages.sample import to_uint8_hwc

log = logging.getLogger("dpgen")


def generator_identity(weights: Path, spec: ReleaseSpec, cfg: DictConfig, run_dir: Path) -> dict[str, Any]:
    """What a resumed set of shards must share with the one it continues: the generator's
    weights, how it is sampled (solver settings, CPSample and its classifier) and the request.

    The weights alone do not say it: ``python -m dpgen.sampling`` copies a DP run's weights into
    a CPSample twin, and shards of the two in one release would carry the DP run's data card.
    """
    sample = {k: v for k, v in OmegaConf.to_container(cfg.sample, resolve=True).items()
              if k not in ("num_samples", "batch_size")}  # the request's own batch size is in the spec
    sampling = cfg.get("sampling")
    classifier = run_dir / CLASSIFIER_FILE
    # Older dpgen versions named an image folder by the class alone: such a release is not continued.
    folders = class_folders(describe_data(cfg.data).class_names) if spec.format == "imagefolder" else None
    return {"model_sha256": sha256_file(weights), **spec.to_json(), "sample": sample, "class_folders": folders,
            "sampling": OmegaConf.to_container(sampling, resolve=True) if sampling is not None else None,
            "protection_classifier_sha256": sha256_file(classifier) if classifier.is_file() else None}


def _existing_manifest(out: Path, identity: dict[str, Any]) -> dict[str, Any] | None:
    """The manifest of the release this call continues; None for a fresh (empty) directory."""
    if out.exists() and not out.is_dir():
        raise ReleaseError(f"--out={out}: is a file. Fix: pass a new or empty directory")
    if not out.exists() or not any(out.iterdir()):
        return None
    manifest_file = out / MANIFEST
    if not manifest_file.is_file():
        raise ReleaseError(f"--out={out}: holds files that are not a dpgen release. Fix: pass a new or empty directory")
    manifest = json.loads(manifest_file.read_text())
    theirs = manifest.get("release", {})
    if "sample" not in theirs:
        raise ReleaseError(f"--out={out}: holds a release started by an older dpgen, which did not record how "
                           "it sampled, so it cannot be continued safely. Fix: pass a new directory")
    differ = [f"{k} {theirs.get(k)!r} vs {v!r}" for k, v in identity.items() if theirs.get(k) != v]
    if differ:
        raise ReleaseError(f"--out={out}: holds another release (differs in {'; '.join(differ)}). "
                           "Fix: pass a new directory, or repeat that release's settings to resume it")
    return manifest


def sample_shard(module: DiffusionModule, labels: np.ndarray, sample_cfg: DictConfig, seed: int,
                 batch_size: int, precision: str = "32", eps_correction: EpsCorrection | None = None) -> np.ndarray:
    """uint8 [n, H, W, C] samples for ``labels`` with the run's sampler settings (and its
    CPSample protection, ``eps_correction``, which needs gradients: no inference mode then);
    ``bf16`` runs the networks under bfloat16 autocast (the sampler's arithmetic and the noise
    stay fp32)."""
    generator = torch.Generator().manual_seed(seed)
    device = next(module.parameters()).device.type
    with (torch.inference_mode(eps_correction is None),
          torch.autocast(device, dtype=torch.bfloat16, enabled=precision == "bf16")):
        images = module.sample(torch.from_numpy(labels), sample_cfg.steps, sample_cfg.guidance_scale,
                               generator=generator, batch_size=batch_size, progress=False,
                               eps_correction=eps_correction, solver=run_solver(sample_cfg))
    return to_uint8_hwc(images)


def _training_split_size(run: SourceRun) -> int:
    size = run.privacy.get("dataset_size")
    return int(size) if size is not None else len(build_dataset(run.cfg.data, "train"))


def write_shards(module: DiffusionModule, sample_cfg: DictConfig, out: Path, spec: ReleaseSpec,
                 identity: dict[str, Any], class_names: Sequence[str], progress: bool = True,
                 replace_other: bool = False, eps_correction: EpsCorrection | None = None) -> dict[str, Any]:
    """Sample and write every shard of ``spec`` that ``out``'s manifest does not list as done
    (creating the manifest for a fresh directory); returns the manifest. ``out`` must be empty
    or hold a release with this ``identity``; with ``replace_other``, any other content of
    ``out`` is deleted first (for samples dpgen itself keeps, never for a user's release)."""
    try:
        manifest = _existing_manifest(out, identity)
    except ReleaseError:
        if not replace_other:
            raise
        log.info("release: %s holds samples of another configuration; replacing them", out)
        shutil.rmtree(out)
        manifest = None
    manifest = manifest or {"release": identity, "shards": {}, "complete": False}
    out.mkdir(parents=True, exist_ok=True)
    write_json(out / MANIFEST, manifest)
    remove_partial_files(out)
    shards = spec.shards
    labels = release_labels(spec.num_samples, len(class_names), spec.class_prior)
    folders = class_folders(class_names)
    done = manifest["shards"]
    bar = tqdm(total=spec.num_samples, initial=sum(b - a for i, (a, b) in enumerate(shards) if str(i) in done),
               desc="release", unit="img", disable=not progress)
    for i, (a, b) in enumerate(shards):
        if str(i) in done:
            continue
        images = sample_shard(module, labels[a:b], sample_cfg, shard_seed(spec.seed, i), spec.batch_size,
                              spec.precision, eps_correction)
        entry: dict[str, Any] = {"start": a, "stop": b}  # imagefolder names follow from the range
        if spec.format == "imagefolder":
            write_imagefolder_shard(out, a, images, labels[a:b], folders, spec.num_samples)
        else:
            write_npz_shard(out, i, len(shards), images, labels[a:b])
            entry["file"] = npz_name(i, len(shards))
        done[str(i)] = entry
        write_json(out / MANIFEST, manifest)
        bar.update(b - a)
    bar.close()
    return manifest


def read_npz_shards(out: Path, spec: ReleaseSpec) -> tuple[np.ndarray, np.ndarray]:
    """A finished npz release as one array of images (uint8 [N, H, W, C]) and one of labels."""
    images, labels = [], []
    for i in range(len(spec.shards)):
        with np.load(out / npz_name(i, len(spec.shards))) as z:
            images.append(z["images"])
            labels.append(z["labels"])
    return np.concatenate(images), np.concatenate(labels)


def make_release(run_dir: str | Path, out: str | Path, spec: ReleaseSpec, device: str = "cpu",
                 progress: bool = True) -> Path:
    """Write (or finish) the release; returns the output directory."""
    out = Path(out)
    run = open_run(run_dir)
    names = run.class_names
    spec.check(len(names))
    identity = generator_identity(run.weights, spec, run.cfg, run.run_dir)
    manifest = _existing_manifest(out, identity)
    if manifest is not None and manifest.get("complete"):
        log.info("release: %s is already complete", out)
        return out

    protection = load_protection_guidance(run.run_dir, run.cfg, device)
    manifest = write_shards(run.generator.to(device), run.cfg.sample, out, spec, identity, names, progress,
                            eps_correction=protection)
    counts = class_counts(spec.num_samples, len(names), spec.class_prior)
    n_shards = len(spec.shards)
    files = ("one folder per class of PNGs, <label>_<class>/<sample index>.png: "
             + ", ".join(class_folders(names)) if spec.format == "imagefolder"
             else f"{n_shards} npz shards samples-*-of-{n_shards:05d}.npz, each with images uint8 "
                  "[n, H, W, C] and labels int64 [n]")
    write_datacard(out, build_datacard(run, spec, counts, _training_split_size(run), device, files))
    manifest["complete"] = True
    write_json(out / MANIFEST, manifest)
    log.info("release: %d samples -> %s", spec.num_samples, out)
    return out
