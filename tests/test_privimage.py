"""PrivImage: the vote histogram's sensitivity and noise, the selection it makes on MNIST-5k vs
alphanumeric glyphs, its charge in the ledger (checked against dp-accounting directly), the
pretraining data, and a tiny end-to-end run."""

from __future__ import annotations

import json
import math

import pytest
import torch
from conftest import compose_config, tiny_overrides
from dp_accounting import GaussianDpEvent, PoissonSampledDpEvent
from dp_accounting.pld.pld_privacy_accountant import PLDAccountant
from dp_accounting.privacy_accountant import NeighboringRelation
from dp_helpers import record_calls, record_instances

from dpgen.config import validate_config
from dpgen.data import DatasetInfo, TensorImageDataset
from dpgen.errors import ConfigError
from dpgen.pipeline import RunContext, run_pipeline
from dpgen.privacy import queries
from dpgen.privacy.queries import noisy_vote_histogram, vote_histogram
from dpgen.stages import training
from dpgen.stages.planning import plan_privacy
from dpgen.stages.semantic import (
    dp_semantic_query,
    load_query_classifier,
    relabel_selection,
    select_public_classes,
    selected_pretraining_path,
    top_k_votes,
    train_query_classifier,
)
from dpgen.stages.training import pretrain_cache_path

GLYPHS_PER_CLASS = 60  # 3720 alphanumeric glyphs: enough for a query classifier, rendered in seconds
# Trained briefly but at a higher rate than the default (88 % on held-out glyphs, ~15 s).
QUERY_CLASSIFIER = ["method.query_classifier.epochs=8", "method.query_classifier.batch_size=64",
                    "method.query_classifier.lr=2e-3"]


def seeded(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


# -- the vote histogram ------------------------------------------------------------------------
@pytest.mark.parametrize("k", [1, 2, 3])
def test_one_example_moves_the_histogram_by_sqrt_k(k):
    votes = torch.stack([torch.randperm(7, generator=seeded(i))[:k] for i in range(50)])
    groups = torch.randint(0, 4, (50,), generator=seeded())
    without = vote_histogram(votes[1:], groups[1:], 4, 7)
    with_it = vote_histogram(votes, groups, 4, 7)
    assert with_it.sum() == 50 * k
    assert (with_it - without).float().norm().item() == pytest.approx(math.sqrt(k))


def test_repeated_votes_are_refused():
    with pytest.raises(ValueError, match="distinct"):
        vote_histogram(torch.tensor([[1, 1]]), torch.tensor([0]), 2, 3)


def test_histogram_noise_is_multiplier_times_sqrt_k():
    votes = torch.tensor([[0, 1]] * 10)
    noisy = [noisy_vote_histogram(votes, torch.zeros(10, dtype=torch.long), 1, 400, 3.0, seeded(i)) for i in range(50)]
    noise = torch.cat(noisy)[:, 2:]  # cells nobody voted for hold the noise alone
    assert noise.std().item() == pytest.approx(3.0 * math.sqrt(2), rel=0.03)
    # Without a generator the noise comes from fresh entropy, whatever the global seed.
    torch.manual_seed(0)
    a = noisy_vote_histogram(votes, torch.zeros(10, dtype=torch.long), 1, 400, 3.0)
    torch.manual_seed(0)
    b = noisy_vote_histogram(votes, torch.zeros(10, dtype=torch.long), 1, 400, 3.0)
    assert not torch.equal(a, b)


def test_greedy_selection_is_disjoint_and_ordered():
    counts = torch.tensor([[9.0, 8.0, 1.0, 0.0, 5.0],
                           [7.0, 8.5, 6.0, 0.0, 0.0]])
    # Row 0 takes 0 (9), row 1 takes 1 (8.5); 1 is gone for row 0, so row 1 adds 2 (6), row 0 adds 4 (5).
    assert select_public_classes(counts, 2) == [[0, 4], [1, 2]]
    with pytest.raises(ValueError):
        select_public_classes(counts, 3)


def test_relabel_selection_keeps_only_selected_classes():
    info = DatasetInfo("glyphs", 4, ("0", "O", "1", "l"), 1, 2)
    labels = torch.tensor([0, 1, 2, 3, 1, 3])
    public = TensorImageDataset(labels.float().view(-1, 1, 1, 1).expand(-1, 1, 2, 2).contiguous(), labels, info)
    data = relabel_selection(public, [["O", "0"], ["l"]])
    images, new = data.tensors
    # Images keep their order; '1' (public label 2) was not selected.
    assert images[:, 0, 0, 0].tolist() == [0.0, 1.0, 3.0, 1.0, 3.0]
    assert new.tolist() == [0, 0, 1, 0, 1]


# -- the query on real MNIST-5k digits vs alphanumeric glyphs ---------------------------------
@pytest.fixture(scope="module")
def glyph_cache(tmp_path_factory):
    """One cache for the module: the rendered glyphs and the query classifier are public and
    depend only on config, so every test reuses them."""
    return tmp_path_factory.mktemp("privimage-cache")


def _query_cfg(cache, *extra):
    return compose_config(["method=privimage", f"paths.cache_dir={cache}", f"public.samples_per_class={GLYPHS_PER_CLASS}",
                           "method.train.steps=4", "method.train.batch_size=64", *QUERY_CLASSIFIER, *extra])


def _query(cache, run_dir, *extra, generator=None):
    ctx = RunContext(cfg=_query_cfg(cache, *extra), run_dir=run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    ctx.ledger = plan_privacy(ctx)
    train_query_classifier(ctx)
    dp_semantic_query(ctx, generator=generator)
    return ctx, json.loads((run_dir / "selection.json").read_text())


def _captured(selection, exact, public_names):
    """Fraction of all votes that went to the classes selected for the voters' own class."""
    picked = sum(exact[int(d), public_names.index(c["public_class"])].item()
                 for d, cs in selection["selected"].items() for c in cs)
    return picked / exact.sum().item()


def test_generous_selection_finds_each_digits_glyph_and_tiny_eps_is_noisier(glyph_cache, tmp_path):
    ctx, generous = _query(glyph_cache, tmp_path / "generous", "privacy.eps=20",
                           "method.query_budget_fraction=0.5", generator=seeded(1))
    assert generous["query"]["noise_std"] < 1.0
    names = generous["public_class_names"]
    noisy = torch.tensor(generous["noisy_counts"])
    for digit in range(10):
        # MNIST digits are handwriting, glyphs are fonts: a '1' also looks like 'l' and 'I', a '9'
        # like 'q'. The top choices (6 of 62 classes) include the digit's own glyph.
        top = [names[i] for i in noisy[digit].argsort(descending=True)[:6]]
        assert str(digit) in top, (digit, top)
    picked = [c["public_class"] for cs in generous["selected"].values() for c in cs]
    assert len(set(picked)) == len(picked) == 30
    own = sum(d in [c["public_class"] for c in cs] for d, cs in generous["selected"].items())

    classifier, _ = load_query_classifier(ctx.cfg)
    votes, labels = top_k_votes(classifier, ctx.train_set, 2)
    exact = vote_histogram(votes, labels, 10, len(names))
    assert (noisy - exact).abs().max() < 5  # generous: noise std < 1
    _, tiny = _query(glyph_cache, tmp_path / "tiny", "privacy.eps=0.05", "method.query_budget_fraction=0.5",
                     generator=seeded(1))
    assert tiny["query"]["noise_std"] > 100 * generous["query"]["noise_std"]
    assert sum(d in [c["public_class"] for c in cs] for d, cs in tiny["selected"].items()) < own
    assert _captured(tiny, exact, names) < _captured(generous, exact, names) - 0.1


def test_query_is_charged_once_and_a_resumed_run_reuses_the_release(glyph_cache, tmp_path):
    ctx, first = _query(glyph_cache, tmp_path, "privacy.eps=2")
    privacy = json.loads(ctx.privacy_json.read_text())
    (event,) = privacy["events"]
    assert event == {"stage": "dp_semantic_query", "mechanism": "gaussian",
                     "noise_multiplier": first["query"]["noise_multiplier"], "count": 1}
    dp_semantic_query(ctx)  # resumed: the stage finds its release and spends nothing
    assert ctx.ledger.steps_spent("dp_semantic_query") == 1
    assert json.loads((tmp_path / "selection.json").read_text()) == first
    (tmp_path / "selection.json").unlink()  # charged, but the release was lost
    with pytest.raises(RuntimeError, match="charged"):
        dp_semantic_query(ctx)


# -- planning, pretraining data, configuration ------------------------------------------------
@pytest.fixture
def privimage_cfg(tiny_cfg, glyph_cache):
    """The tiny run with method=privimage, reading the module's rendered glyphs."""
    def make(*extra: str, method: str = "privimage"):
        return tiny_cfg(f"method={method}", f"public.cache_dir={glyph_cache}/public",
                        f"public.samples_per_class={GLYPHS_PER_CLASS}", *QUERY_CLASSIFIER, *extra)

    return make


def _planned(cfg, run_dir):
    run_dir.mkdir()
    ctx = RunContext(cfg=cfg, run_dir=run_dir)
    ctx.ledger = plan_privacy(ctx)
    return ctx


def test_query_is_planned_before_training_and_all_plans_no_query(privimage_cfg, tmp_path):
    query, train = _planned(privimage_cfg("privacy.eps=1"), tmp_path / "a").ledger.planned
    assert (query.stage, query.mechanism, query.count) == ("dp_semantic_query", "gaussian", 1)
    assert train.stage == "dp_train"
    alone = PLDAccountant(NeighboringRelation.ADD_OR_REMOVE_ONE)
    alone.compose(GaussianDpEvent(query.noise_multiplier))
    assert alone.get_epsilon(1e-5) == pytest.approx(0.1, rel=0.02)  # query_budget_fraction of eps=1

    fixed = _planned(privimage_cfg("method.query_sigma=30"), tmp_path / "b")
    assert fixed.ledger.planned[0].noise_multiplier == 30

    baseline = _planned(privimage_cfg("method.selection=all"), tmp_path / "all")
    assert [e.stage for e in baseline.ledger.planned] == ["dp_train"]
    dp_semantic_query(baseline)
    assert json.loads((baseline.run_dir / "selection.json").read_text())["selection"] == "all"
    assert selected_pretraining_path(baseline) == pretrain_cache_path(baseline.cfg)


def test_public_default_is_alphanumeric_and_command_line_wins(tmp_path):
    base = [f"paths.cache_dir={tmp_path}", "method=privimage"]
    assert compose_config(base).public.charset == "alnum"
    assert compose_config([*base, "public.charset=letters"]).public.charset == "letters"
    assert compose_config([f"paths.cache_dir={tmp_path}"]).public.charset == "digits"  # dpdm unchanged


@pytest.mark.parametrize("override,key", [
    ("method.selection=some", "method.selection"),
    ("method.query_top_k=0", "method.query_top_k"),
    ("method.query_top_k=63", "method.query_top_k"),
    ("method.classes_per_label=7", "method.classes_per_label"),
    ("method.query_budget_fraction=1.0", "method.query_budget_fraction"),
    ("method.query_sigma=-2", "method.query_sigma"),
    ("method.query_classifier.name=vit", "method.query_classifier.name"),
    ("method.pretrain=public", "method.pretrain"),
    ("model=ldm_tiny", "model"),
])
def test_bad_privimage_config_is_refused(privimage_cfg, override, key):
    with pytest.raises(ConfigError) as err:
        validate_config(privimage_cfg(override))
    assert str(err.value).startswith(f"{key}=") and "Fix:" in str(err.value)


def test_privimage_without_public_data_is_refused(tmp_path):
    overrides = [o for o in tiny_overrides(tmp_path) if not o.startswith("public.")]
    with pytest.raises(ConfigError, match=r"^public='none'.*Fix: select a public set"):
        validate_config(compose_config([*overrides, "method=privimage", "public=none"]))


# -- end to end ------------------------------------------------------------------------------
def test_privimage_end_to_end_composes_query_and_training(privimage_cfg, tmp_path, monkeypatch):
    releases = record_calls(monkeypatch, queries, "gaussian_mechanism")  # what the query draws
    loaders = record_instances(monkeypatch, training, "PoissonDataModule")
    cfg = privimage_cfg("privacy.eps=1", "method.query_classifier.epochs=1")
    run_dir = tmp_path / "run"
    ctx = run_pipeline(cfg, run_dir)
    for name in ("selection.json", "samples.npz", "metrics.json", "model.pt"):
        assert (run_dir / name).exists(), name
    selected = json.loads((run_dir / "selection.json").read_text())["selected"]
    assert sorted(selected) == [str(d) for d in range(10)] and all(len(c) == 3 for c in selected.values())
    assert selected_pretraining_path(ctx).exists()  # pretrained on this selection, then fine-tuned
    stages = json.loads((run_dir / "stages.json").read_text())["completed"]
    assert stages == list(cfg.method.stages)
    assert json.loads((run_dir / "metrics.json").read_text())["method"] == "privimage"

    privacy = json.loads((run_dir / "privacy.json").read_text())
    query, train = privacy["events"]
    assert query["stage"] == "dp_semantic_query" and query["count"] == 1
    assert train["stage"] == "dp_train" and train["steps"] == 4
    # The query's noise is the charged σ times √k, from OS entropy (not the public run seed).
    assert [(a[1], a[2], a[3] if len(a) > 3 else k.get("generator")) for a, k in releases] == \
        [(math.sqrt(cfg.method.query_top_k), query["noise_multiplier"], None)]
    assert [m.sample_rate for m in loaders] == [train["sample_rate"]]
    # dp-accounting itself, not the ledger: the query composed with every DP-SGD step.
    acc = PLDAccountant(NeighboringRelation.ADD_OR_REMOVE_ONE)
    acc.compose(GaussianDpEvent(query["noise_multiplier"]))
    acc.compose(PoissonSampledDpEvent(train["sample_rate"], GaussianDpEvent(train["noise_multiplier"])),
                train["steps"])
    eps = acc.get_epsilon(privacy["delta"])
    assert 0.98 <= eps <= 1.0  # the plan spends the whole budget (calibrated within 1 %)
    assert privacy["epsilon_spent"] == pytest.approx(eps, rel=2e-3)


def test_feta_warms_up_from_privimages_selection(privimage_cfg, tmp_path, monkeypatch):
    """method=feta_privimage composes the two methods' stages without code of its own: the
    query, the central images and DP-SGD share one budget, and the warm-up starts from the
    pretraining on the selected public classes."""
    import dpgen.stages.semantic as semantic

    loaded = []
    path_of = semantic.selected_pretraining_path
    monkeypatch.setattr(semantic, "selected_pretraining_path", lambda ctx: loaded.append(path_of(ctx)) or loaded[-1])
    cfg = privimage_cfg("privacy.eps=1", "method.query_classifier.epochs=1", "method.central.rounds=2",
                        "method.warmup.curriculum=[{steps:2,blur:1.0}]", "method.warmup.batch_size=16",
                        method="feta_privimage")
    run_dir = tmp_path / "run"
    run_pipeline(cfg, run_dir)
    assert json.loads((run_dir / "stages.json").read_text())["completed"] == list(cfg.method.stages)
    assert json.loads((run_dir / "metrics.json").read_text())["method"] == "feta_privimage"
    assert loaded and all(p == loaded[0] and p.exists() for p in loaded)  # pretrain_selected wrote what warmup read
    privacy = json.loads((run_dir / "privacy.json").read_text())
    query, central, training = privacy["events"]
    assert [e["stage"] for e in privacy["events"]] == ["dp_semantic_query", "dp_central_images", "dp_train"]
    acc = PLDAccountant(NeighboringRelation.ADD_OR_REMOVE_ONE)
    acc.compose(GaussianDpEvent(query["noise_multiplier"]))
    for event in (central, training):
        acc.compose(PoissonSampledDpEvent(event["sample_rate"], GaussianDpEvent(event["noise_multiplier"])),
                    event["steps"])
    assert 0.98 <= acc.get_epsilon(privacy["delta"]) <= 1.0


@pytest.mark.parametrize(("method", "override"), [
    ("feta", "method.pretrain=selection"),  # feta's config has no query settings
    ("privimage", "method.stages=[dp_semantic_query,pretrain_selected,dp_train,sample,evaluate]"),
    ("feta_privimage", "method.stages=[train_query_classifier,dp_semantic_query,dp_central_images,warmup,"
                       "pretrain_selected,dp_train,sample,evaluate]"),
    ("feta_privimage", "method.pretrain=none"),  # the query would spend ε on a selection nothing loads
])
def test_a_pretraining_no_earlier_stage_makes_is_refused_before_any_work(tiny_cfg, privimage_cfg, method, override):
    """Found only when the stage that loads it ran, the run would fail after ε was spent."""
    cfg = tiny_cfg(f"method={method}", override) if method == "feta" else privimage_cfg(override, method=method)
    with pytest.raises(ConfigError, match=r"Fix: (use method=privimage|put |use method.pretrain=selection)") as err:
        validate_config(cfg)
    assert method == "feta" or "pretrain=none" not in str(err.value)  # the selection's stages refuse that fix
