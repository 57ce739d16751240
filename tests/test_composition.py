"""Releasing several runs together: their ledgers composed (dpgen.privacy.composition,
python -m dpgen.compose, the report's table), checked against dp-accounting directly."""

from __future__ import annotations

import json

import pytest
from dp_accounting import GaussianDpEvent, PoissonSampledDpEvent
from dp_accounting.pld.pld_privacy_accountant import PLDAccountant
from omegaconf import OmegaConf

from dpgen.compose import main
from dpgen.eval.report import MD_NAME, write_report
from dpgen.io import write_json
from dpgen.privacy.composition import (
    SOURCE_RUN,
    combine,
    combine_by_data,
    sensitive_data,
    spent_ledger,
)
from dpgen.privacy.events import GAUSSIAN, POISSON_GAUSSIAN
from dpgen.privacy.journal import JOURNAL, append_spend
from dpgen.privacy.ledger import PlannedStage, PrivacyLedger

Q, SIGMA, DELTA = 0.02, 1.1, 1e-5


def _ledger(steps: int, query_sigma: float | None = None, delta: float = DELTA) -> PrivacyLedger:
    """A run's ledger after ``steps`` DP-SGD steps (and one Gaussian query first, if given)."""
    ledger = PrivacyLedger(100.0, delta, 5000)
    stages = [PlannedStage("dp_train", POISSON_GAUSSIAN, Q, count=steps, noise_multiplier=SIGMA)]
    if query_sigma is not None:
        stages.insert(0, PlannedStage("dp_semantic_query", GAUSSIAN, count=1, noise_multiplier=query_sigma))
    ledger.plan(stages)
    if query_sigma is not None:
        ledger.record("dp_semantic_query", GAUSSIAN, query_sigma)
    ledger.record("dp_train", POISSON_GAUSSIAN, SIGMA, Q, count=steps)
    return ledger


def _reference_epsilon(steps: int, query_sigmas: tuple[float, ...] = (), delta: float = DELTA) -> float:
    """dp-accounting's PLD on the composed events, at a finer discretisation than dpgen's."""
    accountant = PLDAccountant(value_discretization_interval=1e-4)
    accountant.compose(PoissonSampledDpEvent(Q, GaussianDpEvent(SIGMA)), steps)
    for s in query_sigmas:
        accountant.compose(GaussianDpEvent(s))
    return accountant.get_epsilon(delta)


def test_two_runs_compose_like_one_run_of_all_their_mechanisms():
    a, b = _ledger(300, query_sigma=8.0), _ledger(500)
    combined = combine({"a": a.to_json(), "b": b.to_json()})
    assert combined.delta == DELTA
    assert combined.epsilon == pytest.approx(_reference_epsilon(800, (8.0,)), rel=5e-3)
    # Tighter than basic composition, looser than either run alone.
    assert max(a.epsilon_spent(), b.epsilon_spent()) < combined.epsilon < combined.epsilon_sum
    assert combined.epsilon_sum == pytest.approx(a.epsilon_spent() + b.epsilon_spent())
    assert combined.delta_sum == pytest.approx(2 * DELTA)


def test_the_default_delta_is_the_smallest_and_an_explicit_one_is_used():
    a, b = _ledger(300, delta=1e-5), _ledger(300, delta=1e-6)
    assert combine({"a": a.to_json(), "b": b.to_json()}).delta == 1e-6
    assert combine({"a": a.to_json(), "b": b.to_json()}).epsilon == pytest.approx(_reference_epsilon(600, delta=1e-6),
                                                                                 rel=5e-3)
    loose = combine({"a": a.to_json(), "b": b.to_json()}, delta=1e-3)
    assert loose.delta == 1e-3 and loose.epsilon == pytest.approx(_reference_epsilon(600, delta=1e-3), rel=5e-3)


def test_a_run_without_a_guarantee_leaves_the_release_without_one():
    voided = _ledger(300)
    voided.void_guarantee("CPSample's protection classifier read the training images")
    combined = combine({"dp": _ledger(300).to_json(), "cpsample": voided.to_json(), "gone": {}})
    assert combined.without_guarantee == ("cpsample", "gone")
    assert combined.epsilon is None and combined.epsilon_sum is None


@pytest.mark.parametrize("kept_events", [[], slice(0, 1)])
def test_a_ledger_missing_events_is_summed_but_not_composed(kept_events):
    """A hand-made or truncated ledger whose events do not account for the ε it claims."""
    listed = _ledger(300, query_sigma=2.0).to_json()
    partial = {**listed, "events": listed["events"][kept_events] if kept_events else []}
    combined = combine({"a": listed, "b": partial})
    assert combined.epsilon is None
    assert combined.epsilon_sum == pytest.approx(2 * listed["epsilon_spent"])
    assert combine({"a": listed, "b": listed}).epsilon is not None


def test_ledgers_of_another_neighbouring_relation_are_refused():
    other = {**_ledger(300).to_json(), "neighbouring": "replace_one"}
    with pytest.raises(ValueError, match="neighbouring"):
        combine({"a": _ledger(300).to_json(), "b": other})


def test_runs_are_grouped_by_their_sensitive_data():
    assert sensitive_data({"data": {"name": "mnist5k"}}) == sensitive_data({"data": {"name": "mnist"}}) == "mnist"
    # One folder is written many ways (a trailing slash, a link, a relative path): roots never split a group.
    assert sensitive_data({"data": {"name": "imagefolder", "root": "/a"}}) == sensitive_data(
        {"data": {"name": "imagefolder", "root": "/a/"}})
    assert sensitive_data(None).startswith("unknown")
    runs = [("m1", _ledger(300).to_json(), {"data": {"name": "mnist5k"}}),
            ("m2", _ledger(500).to_json(), {"data": {"name": "mnist"}}),
            ("c", _ledger(300).to_json(), {"data": {"name": "cifar10"}})]
    groups = combine_by_data(runs)
    assert {data: c.runs for data, c in groups.items()} == {"cifar10": ("c",), "mnist": ("m1", "m2")}
    assert groups["mnist"].epsilon == pytest.approx(_reference_epsilon(800), rel=5e-3)
    assert groups["cifar10"].epsilon == pytest.approx(_reference_epsilon(300), rel=5e-3)
    # A run whose data is unknown may share people with any of them: it counts in every group.
    groups = combine_by_data([*runs, ("?", _ledger(100).to_json(), None)])
    assert {data: c.runs for data, c in groups.items()} == {"cifar10": ("c", "?"), "mnist": ("m1", "m2", "?")}
    assert groups["cifar10"].epsilon == pytest.approx(_reference_epsilon(400), rel=5e-3)
    assert set(combine_by_data([("?", _ledger(100).to_json(), None)])) == {sensitive_data(None)}


def _run(directory, steps, data="mnist5k", journal_steps=None):
    directory.mkdir(parents=True)
    _ledger(steps).write(directory / "privacy.json")
    if journal_steps is not None:  # steps spent after privacy.json was last written
        append_spend(directory / JOURNAL, _ledger(journal_steps))
    OmegaConf.save({"data": {"name": data}, "method": {"name": "dpdm"}}, directory / "run_config.yaml")
    return directory


def test_a_crashed_runs_journal_counts_the_steps_privacy_json_lacks(tmp_path):
    run = _run(tmp_path / "crashed", 300, journal_steps=450)
    ledger = spent_ledger(run)
    assert sum(e["steps"] for e in ledger["events"]) == 450
    assert ledger["epsilon_spent"] == pytest.approx(_ledger(450).epsilon_spent())
    assert spent_ledger(tmp_path / "nothing-here") == {}


def _composed(out: str) -> float:
    return float(out.split("together, composed (PLD): ε = ")[1].split()[0])


def test_command_line_composes_every_run_found_below_a_sweep(tmp_path, capsys):
    _run(tmp_path / "sweep" / "0", 300)
    _run(tmp_path / "sweep" / "1", 200, journal_steps=500)
    # A canary audit's published results come from a model trained on the sensitive data.
    audit = _run(tmp_path / "sweep" / "audit", 100)
    write_json(audit / "metrics.json", {"canary_audit": {"epsilon_claimed": 1.0}})
    unfinished = _run(tmp_path / "sweep" / "training-audit", 100)  # still training: no metrics.json yet
    OmegaConf.save({"data": {"name": "mnist5k"}, "method": {"name": "dpdm"}, "canary_audit": True},
                   unfinished / "run_config.yaml")
    # A sweep assembled from links to runs elsewhere (os.walk and rglob do not follow them by default).
    (tmp_path / "sweep" / "linked").symlink_to(_run(tmp_path / "elsewhere" / "2", 100))
    (tmp_path / "sweep" / "loop").symlink_to(tmp_path / "sweep")  # a link back up is walked once
    main([str(tmp_path / "sweep")])
    out = capsys.readouterr().out
    assert "sensitive data: mnist" in out and "audit (canary audit): ε" in out and "elsewhere" in out
    assert "training-audit (canary audit): ε" in out
    assert _composed(out) == pytest.approx(_reference_epsilon(1100), rel=5e-3)
    # A run given directly is that run alone.
    main([str(tmp_path / "sweep" / "0")])
    alone = capsys.readouterr().out
    assert _composed(alone) == pytest.approx(_reference_epsilon(300), rel=5e-3)


def test_command_line_composes_datasets_that_share_people_as_one_when_told(tmp_path, capsys):
    _run(tmp_path / "a", 300, data="celeba")
    _run(tmp_path / "b", 500, data="imagefolder")
    main([str(tmp_path)])
    assert capsys.readouterr().out.count("together, composed") == 2
    main([str(tmp_path), "--same-data"])
    out = capsys.readouterr().out
    assert out.count("together, composed") == 1
    assert _composed(out) == pytest.approx(_reference_epsilon(800), rel=5e-3)


def test_command_line_refuses_what_it_cannot_compose(tmp_path):
    with pytest.raises(SystemExit, match="no privacy.json"):
        main([str(tmp_path)])
    with pytest.raises(SystemExit, match="not a directory"):
        main([str(tmp_path / "missing")])
    _run(tmp_path / "run", 300)
    with pytest.raises(SystemExit, match="--delta"):
        main([str(tmp_path / "run"), "--delta", "2"])


def test_the_report_states_what_releasing_its_private_runs_together_costs(tmp_path):
    for name, steps, data in (("0", 300, "mnist5k"), ("1", 500, "mnist5k"), ("2", 400, "cifar10")):
        run = _run(tmp_path / name, steps, data)
        write_json(run / "metrics.json", {"method": "dpdm", "epsilon": _ledger(steps).epsilon_spent(),
                                          "delta": DELTA, "formal_guarantee": True,
                                          "downstream_accuracy": {"mean": 0.5}})
    nonprivate = tmp_path / "3"
    nonprivate.mkdir()
    write_json(nonprivate / "privacy.json", {"formal_guarantee": False, "method": "nonprivate"})
    write_json(nonprivate / "metrics.json", {"method": "nonprivate", "formal_guarantee": False,
                                             "downstream_accuracy": {"mean": 0.9}})
    OmegaConf.save({"data": {"name": "mnist5k"}}, nonprivate / "run_config.yaml")
    write_report(tmp_path)
    md = (tmp_path / MD_NAME).read_text()
    rows = {line.split(" | ")[0].strip("| "): line.split(" | ") for line in md.splitlines()
            if line.startswith(("| mnist ", "| cifar10 "))}
    # The non-private ceiling is not a release: mnist composes runs 0 and 1 only.
    assert rows["mnist"][1] == "2" and rows["cifar10"][1] == "1"
    assert float(rows["mnist"][2]) == pytest.approx(_reference_epsilon(800), rel=5e-3)
    assert float(rows["cifar10"][2]) == pytest.approx(_reference_epsilon(400), rel=5e-3)
    assert json.loads((tmp_path / "0" / "privacy.json").read_text())["formal_guarantee"] is True


def test_a_journal_of_other_privacy_settings_is_not_silently_mixed_in(tmp_path, caplog):
    run = _run(tmp_path / "0", 300)
    other = PrivacyLedger(50.0, DELTA, 5000)  # another ε target: not this ledger's history
    other.plan([PlannedStage("dp_train", POISSON_GAUSSIAN, Q, count=900, noise_multiplier=SIGMA)])
    other.record("dp_train", POISSON_GAUSSIAN, SIGMA, Q, count=900)
    append_spend(run / JOURNAL, other)
    with pytest.raises(ValueError, match="does not belong"):
        spent_ledger(run)
    old_format = tmp_path / "old"
    old_format.mkdir()
    write_json(old_format / "privacy.json", {"epsilon_target": 1.0, "delta": DELTA, "epsilon_spent": 0.5})
    append_spend(old_format / JOURNAL, _ledger(10))
    with pytest.raises(ValueError, match="does not belong"):
        spent_ledger(old_format)
    with pytest.raises(SystemExit, match="does not belong"):
        main([str(run)])
    write_json(run / "metrics.json", {"method": "dpdm", "formal_guarantee": True, "downstream_accuracy": {"mean": 0.5}})
    write_report(tmp_path)
    assert "| mnist | 1 | none (0: no usable ledger) |" in (tmp_path / MD_NAME).read_text()
    assert "does not belong" in caplog.text


def _resampling(source, directory, void=False):
    """What python -m dpgen.sampling makes of ``source``: its ledger copied, its source recorded."""
    directory.mkdir(parents=True)
    ledger = PrivacyLedger.from_json(json.loads((source / "privacy.json").read_text()))
    if void:  # CPSample: the protection classifier read the training images
        ledger.void_guarantee("CPSample")
    ledger.write(directory / "privacy.json")
    write_json(directory / SOURCE_RUN, {"source_run": str(source.resolve())})
    OmegaConf.save({"data": {"name": "mnist5k"}}, directory / "run_config.yaml")
    return directory


def test_a_resampling_adds_nothing_to_its_composed_source(tmp_path, capsys):
    source = _run(tmp_path / "sweep" / "0", 300)
    _run(tmp_path / "sweep" / "1", 500)
    resampled = _resampling(source, tmp_path / "sweep" / "0-ddim")
    main([str(tmp_path / "sweep")])
    out = capsys.readouterr().out
    assert f"{resampled}: re-samples {source}" in out
    assert _composed(out) == pytest.approx(_reference_epsilon(800), rel=5e-3)
    # Alone, a resampling stands for its source's training.
    main([str(resampled)])
    assert _composed(capsys.readouterr().out) == pytest.approx(_reference_epsilon(300), rel=5e-3)
    # A resampling that voided the guarantee (CPSample) voids a release that includes it.
    _resampling(source, tmp_path / "sweep" / "0-cpsample", void=True)
    main([str(tmp_path / "sweep")])
    assert "together: no formal guarantee" in capsys.readouterr().out
    # In the report too, a resampling of a reported run is not composed again.
    for run in ("0", "1", "0-ddim"):
        write_json(tmp_path / "sweep" / run / "metrics.json", {"method": "dpdm", "formal_guarantee": True,
                                                               "downstream_accuracy": {"mean": 0.5}})
    write_report(tmp_path / "sweep")
    md = (tmp_path / "sweep" / MD_NAME).read_text()
    row = next(line for line in md.splitlines() if line.startswith("| mnist "))
    assert row.split(" | ")[1] == "2" and float(row.split(" | ")[2]) == pytest.approx(_reference_epsilon(800), rel=5e-3)
