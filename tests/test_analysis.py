"""Behaviour of the Experiment 1 analysis: weight recovery, dropped scenarios, parsing and the files written."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Sequence

import numpy as np
import pandas as pd
import pytest
from hypothesis import given
from hypothesis import strategies as st

from selfinterp.analysis import LEARNED_COLS, SCENARIO_COLS, analyze, analyze_command, load_decisions, rescale, summary
from selfinterp.dataset import A_COLS, B_COLS, DecisionData, build_data, write_data
from selfinterp.errors import UserError
from selfinterp.plots import recovery_curve_figure, save_figure
from selfinterp.trials import Trial, target_choice

RANGES = [[0, 100], [1, 5], [0, 0.5], [10, 1000], [-20, 40]]
METRIC_KEYS = {
    "regression", "r", "p_value", "r_ci95", "spearman", "r_per_attribute", "mean_scenario_r", "mae", "rmse",
    "agreement", "agreement_top_k", "rule_top_k", "auc", "parse_failure", "frac_A", "n_decisions", "n_valid", "n_scenarios", "n_scenarios_fit",
    "scenarios_dropped",
}


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> DecisionData:
    """100 synthetic scenarios (varied attribute ranges) with 50 test trials each."""
    catalog = [
        {
            "short_name": f"s{i}",
            "question": f"Which option is better in situation {i}?",
            "attributes": [
                {"name": f"attribute {j}", "units": "units", "range": RANGES[(i + j) % len(RANGES)]} for j in range(5)
            ],
        }
        for i in range(100)
    ]
    path = tmp_path_factory.mktemp("catalog") / "catalog.json"
    path.write_text(json.dumps(catalog), encoding="utf-8")
    return build_data(n_scenarios=100, n_test=50, catalog=str(path))


def frame(trials: Sequence[Trial], selections: Sequence[object]) -> pd.DataFrame:
    """A decisions table as the evaluation writes it."""
    return pd.DataFrame(
        {
            "scenario": [t.scenario for t in trials],
            "selection": list(selections),
            **{c: [t.a[k] for t in trials] for k, c in enumerate(A_COLS)},
            **{c: [t.b[k] for t in trials] for k, c in enumerate(B_COLS)},
        }
    )


def oracle(data: DecisionData, n_scenarios: int = 100) -> pd.DataFrame:
    trials = [t for t in data.test_trials if t.scenario < n_scenarios]
    return frame(trials, [t.label for t in trials])


def test_oracle_choices_recover_the_target_weights(data: DecisionData) -> None:
    m = analyze(oracle(data, 25), data.scenarios, data.weights).metrics
    assert m["r"] >= 0.95
    assert m["r_ci95"][0] < m["r"] < m["r_ci95"][1]
    assert m["agreement"] == 1.0
    assert m["parse_failure"] == 0.0
    assert (m["n_decisions"], m["n_valid"], m["n_scenarios"], m["n_scenarios_fit"]) == (1250, 1250, 25, 25)
    assert m["scenarios_dropped"] == []
    assert all(r > 0.9 for r in m["r_per_attribute"])


def test_top_k_agreement_finds_a_model_that_reads_only_the_heaviest_attribute(data: DecisionData) -> None:
    trials = [t for t in data.test_trials if t.scenario < 20]
    heaviest = []
    for t in trials:
        w = data.weights[t.scenario]
        top = int(np.argmax(np.abs(w)))
        heaviest.append(target_choice(data.scenarios[t.scenario], [x if i == top else 0 for i, x in enumerate(w)], t.a, t.b))
    m = analyze(frame(trials, heaviest), data.scenarios, data.weights).metrics
    cut = m["rule_top_k"]
    assert m["agreement_top_k"][0] == 1.0
    assert m["agreement_top_k"][-1] == m["agreement"] == cut[0]  # the full rule is the last cut
    assert cut[-1] == 1.0 and 0.55 < cut[0] < 0.9  # one attribute of five says much, not all
    # The oracle matches every cut rule exactly as often as the cut rule matches the full rule
    m = analyze(oracle(data, 20), data.scenarios, data.weights).metrics
    assert m["agreement_top_k"] == m["rule_top_k"] == cut
    assert "k = 1..5: " + ", ".join(f"{x:.1%}" for x in cut) in summary(m)


def test_random_choices_recover_nothing(data: DecisionData) -> None:
    rng = np.random.default_rng(0)
    decisions = frame(data.test_trials, rng.choice(["A", "B"], size=len(data.test_trials)))
    m = analyze(decisions, data.scenarios, data.weights).metrics
    assert m["n_scenarios_fit"] == 100
    assert abs(m["r"]) < 0.15
    assert 0.4 < m["agreement"] < 0.6


def test_all_a_gives_no_weights_and_says_so(data: DecisionData) -> None:
    trials = [t for t in data.test_trials if t.scenario < 10]
    result = analyze(frame(trials, ["A"] * len(trials)), data.scenarios, data.weights)
    m = result.metrics
    assert m["n_scenarios_fit"] == 0
    assert m["scenarios_dropped"] == [{"scenario": s, "reason": "one class"} for s in range(10)]
    assert m["r"] is None and m["r_ci95"] is None and m["mae"] is None
    assert m["frac_A"] == 1.0
    assert result.learned[LEARNED_COLS].isna().all().all()
    text = summary(m)
    assert "r = undefined" in text and "0 (one class)" in text


def test_auc_sees_p_b_follow_the_rule_while_every_greedy_answer_is_a(data: DecisionData) -> None:
    trials = [t for t in data.test_trials if t.scenario < 10]
    decisions = frame(trials, ["A"] * len(trials))
    assert analyze(decisions, data.scenarios, data.weights).metrics["auc"] is None  # no P(B) column
    # P(B) below one half everywhere, but higher on the trials whose target is B
    decisions["p_b"] = [0.30 if t.label == "B" else 0.20 for t in trials]
    m = analyze(decisions, data.scenarios, data.weights).metrics
    assert m["auc"] == 1.0 and m["frac_A"] == 1.0 and m["n_scenarios_fit"] == 0
    decisions["p_b"] = 0.25  # P(B) ignores the trial: ties everywhere
    assert analyze(decisions, data.scenarios, data.weights).metrics["auc"] == 0.5
    decisions["p_b"] = [0.20 if t.label == "B" else 0.30 for t in trials]
    assert analyze(decisions, data.scenarios, data.weights).metrics["auc"] == 0.0
    assert "AUC 0.000" in summary(analyze(decisions, data.scenarios, data.weights).metrics)


def test_separated_scenario_is_finite_under_paper_and_dropped_under_mle(data: DecisionData) -> None:
    decisions = oracle(data, 1)  # the target rule is linear, so its choices are perfectly separated
    paper = analyze(decisions, data.scenarios, data.weights, regression="paper")
    weights = paper.learned[LEARNED_COLS].to_numpy()
    assert np.isfinite(weights).all() and np.abs(weights).max() == 100
    mle = analyze(decisions, data.scenarios, data.weights, regression="mle")
    assert mle.metrics["scenarios_dropped"] == [{"scenario": 0, "reason": "perfect separation"}]
    assert mle.learned[LEARNED_COLS].isna().all().all()


def test_mle_recovers_weight_signs_from_noisy_choices(data: DecisionData) -> None:
    rng = np.random.default_rng(1)
    trials = [t for t in data.test_trials if t.scenario < 30]
    flip = {"A": "B", "B": "A"}
    noisy = [flip[t.label] if rng.random() < 0.15 else t.label for t in trials]
    m = analyze(frame(trials, noisy), data.scenarios, data.weights, regression="mle").metrics
    assert m["n_scenarios_fit"] >= 25
    assert m["r"] > 0.6


def test_too_few_valid_answers_drops_the_scenario(data: DecisionData) -> None:
    decisions = oracle(data, 2)
    decisions.loc[(decisions["scenario"] == 1) & (decisions.index % 50 >= 8), "selection"] = "?"
    m = analyze(decisions, data.scenarios, data.weights).metrics
    assert m["scenarios_dropped"] == [{"scenario": 1, "reason": "too few valid answers"}]
    assert m["n_scenarios_fit"] == 1 and m["r"] is not None


def test_per_scenario_rows_tell_a_learned_scenario_from_one_stuck_on_a_letter(data: DecisionData) -> None:
    trials = [t for t in data.test_trials if t.scenario < 3]
    first5 = [t for t in trials if t.scenario == 2][:5]
    # Scenario 0 follows its rule, 1 answers "A" to everything, 2 follows its rule on its first 5 trials only
    choices = [t.label if t.scenario == 0 or any(t is f for f in first5) else "A" if t.scenario == 1 else "?"
               for t in trials]
    decisions = frame(trials, choices)
    decisions["p_b"] = [0.9 if (t.label == "B") == (t.scenario != 1) else 0.1 for t in trials]
    rows = analyze(decisions, data.scenarios, data.weights).per_scenario.set_index("scenario")
    share_a = [np.mean([t.label == "A" for t in trials if t.scenario == s]) for s in range(3)]
    assert rows["n_decisions"].tolist() == [50, 50, 50] and rows["n_valid"].tolist() == [50, 50, 5]
    assert rows.loc[0, "agreement"] == 1.0 and rows.loc[2, "agreement"] == 1.0
    assert rows.loc[1, "agreement"] == share_a[1] and rows.loc[1, "frac_A"] == 1.0
    assert rows.loc[0, "frac_A"] == share_a[0]
    assert rows.loc[2, "frac_A"] == np.mean([t.label == "A" for t in first5]) / 10  # 45 of its 50 answers are "?"
    assert rows["auc"].tolist() == [1.0, 0.0, 1.0]  # P(B) ranks scenario 1's trials backwards
    assert rows["weights"].tolist() == ["fit", "one class", "too few valid answers"]


@given(st.lists(st.floats(-1e6, 1e6), min_size=5, max_size=5).filter(lambda v: max(map(abs, v)) > 1e-3))
def test_rescale_keeps_signs_and_puts_the_largest_at_100(coefs: list[float]) -> None:
    w = rescale(coefs)
    assert np.abs(w).max() == 100
    assert np.array_equal(w, np.round(w))
    assert all(np.sign(wi) in (0, np.sign(c)) for wi, c in zip(w, coefs))


def test_unparseable_answers_are_excluded_counted_and_never_a(data: DecisionData) -> None:
    decisions = oracle(data, 20)
    n = len(decisions)
    decisions.loc[:5, "selection"] = ["C", "", "Answer: A", np.nan, " A ", "B\n"]
    m = analyze(decisions, data.scenarios, data.weights).metrics
    assert m["n_valid"] == n - 4
    assert m["parse_failure"] == 4 / n
    n_a = sum(t.label == "A" for t in data.test_trials[6:n]) + 1  # " A " counts as A after stripping
    assert m["frac_A"] == n_a / n
    assert m["agreement"] == (n - 4 - (data.test_trials[4].label != "A") - (data.test_trials[5].label != "B")) / (n - 4)


def test_missing_or_non_numeric_columns_are_named(data: DecisionData, tmp_path: Path) -> None:
    path = tmp_path / "decisions.csv"
    oracle(data, 2).drop(columns="B_attribute_3").to_csv(path, index=False)
    with pytest.raises(UserError, match=r"decisions\.csv.*B_attribute_3"):
        load_decisions(path)
    broken = oracle(data, 2)
    broken["A_attribute_2"] = broken["A_attribute_2"].astype(object)
    broken.loc[3, "A_attribute_2"] = "lots"
    broken.to_csv(path, index=False)
    with pytest.raises(UserError, match=r"A_attribute_2.*'lots'"):
        load_decisions(path)


def test_bad_scenario_index_or_regression_is_a_user_error(data: DecisionData) -> None:
    decisions = oracle(data, 2)
    with pytest.raises(UserError, match="regression must be one of paper, mle"):
        analyze(decisions, data.scenarios, data.weights, regression="bayes")
    with pytest.raises(UserError, match=r"scenario\(s\) \[1\]"):
        analyze(decisions, data.scenarios[:1], data.weights)


def test_analyze_command_writes_results(data: DecisionData, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    write_data(data, tmp_path / "data")
    run = tmp_path / "run"
    run.mkdir()
    decisions = oracle(data, 20)
    decisions["raw_answer"] = decisions["selection"]
    decisions.to_csv(run / "choices.csv", index=False)
    metrics = analyze_command(str(run / "choices.csv"), str(tmp_path / "data" / "scenarios.csv"))
    for name in ["experiment1_results.json", "learned_weights.csv", "scenario_metrics.csv", "weight_comparison.png",
                 "per_attribute_comparison.png", "inference_decisions.csv"]:
        assert (run / name).stat().st_size > 0, name
    saved = json.loads((run / "experiment1_results.json").read_text())
    assert set(saved) == METRIC_KEYS and saved == metrics
    learned = pd.read_csv(run / "learned_weights.csv")
    assert list(learned.columns) == ["scenario", *LEARNED_COLS]
    assert learned["scenario"].tolist() == list(range(20))
    per_scenario = pd.read_csv(run / "scenario_metrics.csv")
    assert list(per_scenario.columns) == SCENARIO_COLS
    assert per_scenario["scenario"].tolist() == list(range(20)) and (per_scenario["agreement"] == 1.0).all()
    assert "raw_answer" in pd.read_csv(run / "inference_decisions.csv").columns
    assert "r = 0.9" in capsys.readouterr().out


def test_recovery_curve_tolerates_missing_points(tmp_path: Path) -> None:
    fig = recovery_curve_figure([0, 1, 2], [None, 0.5, 0.9], [0.5, None, 0.95], [0.5, 0.7, None])
    assert [line.get_label() for line in fig.axes[0].lines][:3] == [
        "r (learned vs target weights)", "agreement with target rule", "AUC of P(B) for the rule's choice"]
    save_figure(fig, tmp_path / "curve.png")
    assert (tmp_path / "curve.png").read_bytes()[:4] == b"\x89PNG"
    without_auc = recovery_curve_figure([0, 1], [None, 0.5], [0.5, 0.6], [None, None])
    assert "AUC of P(B) for the rule's choice" not in [line.get_label() for line in without_auc.axes[0].lines]


def test_analysis_does_not_import_torch() -> None:
    code = "import sys, selfinterp.analysis, selfinterp.plots; sys.exit('torch' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code]).returncode == 0
