"""DP-FETA: the central-image mechanism's noise scale, sensitivity and normaliser, the privacy plan
and an independent dp-accounting recomputation, the warm-up curriculum, and a tiny run."""

from __future__ import annotations

import json
import math

import pytest
import torch
from dp_accounting import GaussianDpEvent, PoissonSampledDpEvent
from dp_accounting.pld.pld_privacy_accountant import PLDAccountant
from dp_accounting.privacy_accountant import NeighboringRelation
from dp_helpers import record_calls, record_instances

from dpgen.config import validate_config
from dpgen.data.curriculum import CurriculumBatches, Phase, random_affine
from dpgen.errors import ConfigError
from dpgen.io import save_torch
from dpgen.pipeline import RunContext, run_pipeline
from dpgen.privacy import class_means
from dpgen.privacy.accounting import compute_epsilon
from dpgen.privacy.class_means import CentralImageQuery, nominal_class_counts
from dpgen.stages import central as central_stage
from dpgen.stages import training
from dpgen.stages.planning import plan_privacy
from dpgen.stages.training import pretrain_cache_path

FETA = ["method=feta", "method.central.rounds=3",
        "method.warmup.curriculum=[{steps:2,blur:1.0},{steps:1,blur:0}]", "method.warmup.batch_size=16"]


def seeded(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


@pytest.mark.parametrize(("clip_norm", "sensitivity"), [(None, math.sqrt(3 * 64 * 64)), (3.0, 3.0)])
def test_noise_std_is_sigma_times_stated_sensitivity_over_nominal_count(clip_norm, sensitivity):
    query = CentralImageQuery(num_classes=10, channels=3, resolution=64, noise_multiplier=2.5, clip_norm=clip_norm)
    assert query.sensitivity == pytest.approx(sensitivity)
    nominal = nominal_class_counts(4000, 0.5, [1.0] * 10)
    zero_sums = torch.zeros(10, 3, 64, 64, dtype=torch.float64)
    noise = query.release(zero_sums, nominal, generator=seeded())
    # 122880 draws: the sample std is within ~0.5 % of the truth.
    assert noise.std().item() == pytest.approx(2.5 * sensitivity / 200.0, rel=0.02)
    assert abs(noise.mean().item()) < 0.02 * noise.std().item()


@pytest.mark.parametrize("clip_norm", [None, 3.0])
def test_one_example_moves_the_sum_table_by_at_most_the_stated_sensitivity(clip_norm):
    query = CentralImageQuery(num_classes=4, channels=1, resolution=8, noise_multiplier=1.0, clip_norm=clip_norm)
    g = seeded(1)
    images = torch.rand(50, 1, 16, 16, generator=g) * 2 - 1
    labels = torch.randint(4, (50,), generator=g)
    base = query.class_sums(images, labels)
    # Out-of-range pixels and an all-white image: the bound must hold whatever the data holds.
    extremes = [torch.full((1, 1, 16, 16), 1.0), torch.full((1, 1, 16, 16), 5.0),
                torch.randn(1, 1, 16, 16, generator=g) * 3]
    for x in extremes:
        neighbour = query.class_sums(torch.cat([images, x]), torch.cat([labels, torch.tensor([2])]))
        change = (neighbour - base).norm().item()
        assert change <= query.sensitivity + 1e-9
        assert (neighbour - base)[[0, 1, 3]].abs().max() == 0  # only its own class moves
    white = query.class_sums(torch.ones(1, 1, 16, 16), torch.tensor([0])).norm().item()
    assert white == pytest.approx(query.sensitivity)  # the bound is tight


def test_means_divide_by_the_nominal_count_not_the_realised_one():
    query = CentralImageQuery(num_classes=3, channels=1, resolution=4, noise_multiplier=1e-9)
    # Realised counts 5, 50 and 0 against a nominal 10 per class.
    images = torch.ones(55, 1, 4, 4)
    labels = torch.tensor([0] * 5 + [1] * 50)
    nominal = nominal_class_counts(60, 0.5, [1.0, 1.0, 1.0])
    assert nominal.tolist() == pytest.approx([10.0, 10.0, 10.0])
    means = query.release(query.class_sums(images, labels), nominal, generator=seeded())
    assert means[:, 0, 0, 0].tolist() == pytest.approx([0.5, 5.0, 0.0], abs=1e-6)


def test_nominal_counts_follow_public_proportions():
    counts = nominal_class_counts(4000, 0.25, [1, 3])
    assert counts.tolist() == pytest.approx([250.0, 750.0])
    with pytest.raises(ValueError, match="positive"):
        nominal_class_counts(4000, 0.25, [1, 0])


def test_plan_gives_central_images_their_share_and_training_the_rest(tiny_cfg, tmp_path):
    cfg = tiny_cfg(*FETA, "privacy.eps=2", "method.central.budget_fraction=0.25")
    ctx = RunContext(cfg=cfg, run_dir=tmp_path)
    ledger = plan_privacy(ctx)
    central, train = ledger.planned
    assert (central.stage, central.sample_rate, central.count) == ("dp_central_images", 0.5, 3)
    assert train.stage == "dp_train" and train.count == 4
    assert compute_epsilon([central], ledger.delta) == pytest.approx(0.5, rel=0.011)
    assert 2.0 * 0.99 <= compute_epsilon([central, train], ledger.delta) <= 2.0  # the rest goes to training


@pytest.mark.parametrize(("override", "key"), [
    ("method.central.budget_fraction=1.0", "method.central.budget_fraction"),
    ("method.central.resolution=32", "method.central.resolution"),
    ("method.central.sample_rate=0", "method.central.sample_rate"),
    ("method.central.class_proportions=[1,2]", "method.central.class_proportions"),
    ("method.warmup.curriculum=[{steps:0,blur:1}]", "method.warmup.curriculum[0].steps"),
    ("method.stages=[warmup,dp_train,sample]", "method.stages"),
    ("method.stages=[dp_central_images,dp_train,warmup]", "method.stages"),
])
def test_bad_feta_config_fails_before_any_work(tiny_cfg, override, key):
    with pytest.raises(ConfigError) as err:
        validate_config(tiny_cfg("method=feta", override))
    assert err.value.key == key


def test_curriculum_goes_from_blurred_to_sharp():
    g = seeded(2)
    images = (torch.rand(6, 1, 16, 16, generator=g) > 0.7).float() * 2 - 1
    batches = list(CurriculumBatches(images, torch.arange(6), [Phase(3, 1.5), Phase(3, 0.0)], 8,
                                     augment=lambda x, g: x, seed=0))
    assert len(batches) == 6 and all(x.shape == (8, 1, 16, 16) for x, _ in batches)

    def roughness(x):  # mean absolute difference of horizontal neighbours
        return (x[..., 1:] - x[..., :-1]).abs().mean().item()

    assert max(roughness(x) for x, _ in batches[:3]) < 0.5 * min(roughness(x) for x, _ in batches[3:])


def test_random_affine_distorts_each_image_on_its_own():
    x = -torch.ones(8, 1, 16, 16)
    x[:, :, 4:12, 6:10] = 1.0
    g = seeded(3)
    assert torch.allclose(random_affine(0, 0, [1, 1], 0)(x, g), x, atol=1e-5)
    y = random_affine(15, 0.12, [0.85, 1.15], 10)(x, g)
    assert y.shape == x.shape and y.min() >= -1 - 1e-5 and y.max() <= 1 + 1e-5
    assert all(not torch.allclose(y[0], y[i], atol=1e-3) for i in range(1, 8))
    assert torch.allclose(y[:, :, 0, 0], torch.full((8, 1), -1.0))  # background fill stays background


def test_a_crash_after_the_central_images_keeps_their_charge_on_resume(tiny_cfg, tmp_path, monkeypatch):
    """The rounds were released and charged before the crash: the resumed run reuses the images
    and its privacy.json still lists their rounds (a resume that did not read privacy.json, and
    so lost them, passed every other test)."""
    from dpgen.stages import registry as stages

    warmup = stages.STAGES["warmup"]

    def crash(ctx):
        raise RuntimeError("crash in warmup")

    monkeypatch.setitem(stages.STAGES, "warmup", crash)
    run_dir = tmp_path / "run"
    cfg = tiny_cfg(*FETA, "privacy.eps=1")
    with pytest.raises(RuntimeError, match="crash in warmup"):
        run_pipeline(cfg, run_dir)
    released = (run_dir / "central_images.pt").read_bytes()
    monkeypatch.setitem(stages.STAGES, "warmup", warmup)
    run_pipeline(cfg, run_dir)
    events = json.loads((run_dir / "privacy.json").read_text())["events"]
    assert [(e["stage"], e["steps"]) for e in events] == [("dp_central_images", 3), ("dp_train", 4)]
    assert (run_dir / "central_images.pt").read_bytes() == released


def test_rounds_released_before_a_crash_are_kept_and_the_grid_is_rebuilt(tiny_cfg, tmp_path, monkeypatch):
    """A round is charged before its noise is drawn: one released before a crash is the run's to
    keep (it used to live in memory only, so its cost bought nothing), and a crash between
    central_images.pt and its grid must not lose the grid."""
    release = CentralImageQuery.release
    calls = []

    def crash_in_round_three(self, *args, **kwargs):
        calls.append(1)
        if len(calls) == 3:
            raise RuntimeError("killed in round 3")
        return release(self, *args, **kwargs)

    monkeypatch.setattr(CentralImageQuery, "release", crash_in_round_three)
    run_dir = tmp_path / "run"
    cfg = tiny_cfg(*FETA, "privacy.eps=1", "method.stages=[dp_central_images]")
    with pytest.raises(RuntimeError, match="killed in round 3"):
        run_pipeline(cfg, run_dir)
    kept = torch.load(run_dir / central_stage.RELEASED_ROUNDS)["means"]
    assert kept.shape[0] == 2 and not (run_dir / "central_images.pt").exists()

    monkeypatch.setattr(CentralImageQuery, "release", release)
    # More kept rounds than privacy.json charges (an older copy of it put back): never released.
    save_torch(run_dir / central_stage.RELEASED_ROUNDS, {"means": torch.cat([kept, kept])})
    with pytest.raises(RuntimeError, match="holds 4 released rounds but .* charges only 3"):
        run_pipeline(cfg, run_dir)
    assert not (run_dir / "central_images.pt").exists()
    save_torch(run_dir / central_stage.RELEASED_ROUNDS, {"means": kept})
    run_pipeline(cfg, run_dir)  # round 3 was charged and lost; rounds 1-2 are kept
    central = torch.load(run_dir / "central_images.pt")
    classes = cfg.data.num_classes
    assert central["images"].shape[0] == 2 * classes
    assert torch.equal(central["images"], kept.flatten(0, 1).clamp(0, 1) * 2 - 1)
    events = json.loads((run_dir / "privacy.json").read_text())["events"]
    assert [(e["stage"], e["steps"]) for e in events] == [("dp_central_images", 3)]
    assert not (run_dir / central_stage.RELEASED_ROUNDS).exists()

    (run_dir / "central_images.png").unlink()  # as if killed between the two writes
    stages = json.loads((run_dir / "stages.json").read_text())
    (run_dir / "stages.json").write_text(json.dumps({**stages, "completed": []}))
    run_pipeline(cfg, run_dir)
    assert (run_dir / "central_images.png").exists()
    assert torch.equal(torch.load(run_dir / "central_images.pt")["images"], central["images"])


def test_feta_end_to_end(tiny_cfg, tmp_path, monkeypatch):
    start = {}
    original_fit_dp = training.fit_dp

    def remember_start(ctx, module, dataset, stage):
        start.update({k: v.clone() for k, v in module.generator_state_dict().items()})
        original_fit_dp(ctx, module, dataset, stage)

    monkeypatch.setattr(training, "fit_dp", remember_start)
    # What the stages draw, to compare with what the ledger charges (a mutation review found
    # nothing tied them together: noise at σ/2 or the whole split instead of a subsample passed).
    run_dir = tmp_path / "run"
    on_disk = []  # central rounds privacy.json shows when each round's noise is drawn
    noise = class_means.gaussian_mechanism

    def charged_first(*args, **kwargs):
        events = json.loads((run_dir / "privacy.json").read_text())["events"]
        on_disk.append(sum(e["steps"] for e in events if e["stage"] == "dp_central_images"))
        return noise(*args, **kwargs)

    monkeypatch.setattr(class_means, "gaussian_mechanism", charged_first)
    releases = record_calls(monkeypatch, class_means, "gaussian_mechanism")
    subsamples = record_calls(monkeypatch, central_stage, "_subsample_sums")
    samplers = record_instances(monkeypatch, central_stage, "PoissonBatchSampler")
    loaders = record_instances(monkeypatch, training, "PoissonDataModule")
    cfg = tiny_cfg(*FETA, "privacy.eps=1")
    validate_config(cfg)
    run_pipeline(cfg, run_dir)

    privacy = json.loads((run_dir / "privacy.json").read_text())
    central, train = privacy["events"]
    assert (central["stage"], central["steps"], central["sample_rate"]) == ("dp_central_images", 3, 0.5)
    assert (train["stage"], train["steps"]) == ("dp_train", 4)
    sensitivity = torch.load(run_dir / "central_images.pt")["sensitivity"]
    assert [(a[1], a[2], a[3] if len(a) > 3 else k.get("generator")) for a, k in releases] == \
        [(sensitivity, central["noise_multiplier"], None)] * 3  # charged σ, OS-entropy noise
    assert on_disk == [1, 2, 3]  # each round charged, on disk, before its noise
    assert [s.sample_rate for s in samplers] == [central["sample_rate"]]
    sizes = [len(a[2]) for a, _ in subsamples]
    n_train = privacy["dataset_size"]
    assert len(sizes) == 3 and len(set(sizes)) > 1 and all(0.45 < n / n_train < 0.55 for n in sizes)  # Bin(N, q)
    assert [m.sample_rate for m in loaders] == [train["sample_rate"]]
    assert privacy["epsilon_spent"] <= 1.0
    # Independent recomputation: compose the file's events with dp-accounting directly.
    acc = PLDAccountant(NeighboringRelation.ADD_OR_REMOVE_ONE)
    for e in privacy["events"]:
        acc.compose(PoissonSampledDpEvent(e["sample_rate"], GaussianDpEvent(e["noise_multiplier"])), e["steps"])
    assert acc.get_epsilon(privacy["delta"]) == pytest.approx(privacy["epsilon_spent"], rel=0.01)

    stored = torch.load(run_dir / "central_images.pt")
    assert stored["images"].shape == (30, 1, 8, 8) and stored["labels"].tolist() == list(range(10)) * 3
    assert stored["images"].min() >= -1 and stored["images"].max() <= 1
    assert stored["sensitivity"] == pytest.approx(3.0)
    assert stored["nominal_counts"].tolist() == pytest.approx([200.0] * 10)
    for name in ("central_images.png", "warmup_samples.png", "samples.npz", "metrics.json"):
        assert (run_dir / name).exists(), name

    # DP-SGD started from the warm-up, which moved away from the public pretraining.
    warm = torch.load(run_dir / "warmup.pt")
    public = torch.load(pretrain_cache_path(cfg))
    assert all(torch.equal(start[k], warm[k]) for k in warm)
    assert any(not torch.equal(warm[k], public[k]) for k in public)
