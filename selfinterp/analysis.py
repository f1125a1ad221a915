"""Experiment 1 analysis: recover the weights a model acts on from its choices and compare them with the targets.

Per scenario, a logistic regression of the valid A/B choices on the range-normalised attribute
differences gives five coefficients. Rescaled so the largest |coef| is 100, they are comparable
with the instilled weights; the Pearson r over all scenario x attribute pairs says whether the
preferences were instilled (Plunkett et al. 2025, Experiment 1).
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import pandas as pd
from scipy import optimize, special, stats
from statsmodels.discrete.discrete_model import Logit
from statsmodels.tools.sm_exceptions import ConvergenceWarning, PerfectSeparationError, PerfectSeparationWarning

from selfinterp.atomic import write_json, write_text
from selfinterp.catalog import N_ATTRIBUTES, Scenario
from selfinterp.dataset import A_COLS, B_COLS, WEIGHTS_CSV, read_scenarios, read_weights
from selfinterp.errors import UserError
from selfinterp.trials import target_choice

REGRESSIONS = ("paper", "mle")
LEARNED_COLS = [f"b_attr{i}" for i in range(1, N_ATTRIBUTES + 1)]
REQUIRED_COLS = ["scenario", "selection", *A_COLS, *B_COLS]

SLOPE_PRIOR_SD = 1.0
INTERCEPT_PRIOR_SD = 2.5
# A maximum-likelihood coefficient this large on a range-normalised difference means the fit is
# running off towards a deterministic rule, i.e. the data are (quasi-)separated.
MLE_MAX_ABS_COEF = 50.0

TOO_FEW = "too few valid answers"
ONE_CLASS = "one class"
SEPARATION = "perfect separation"

RESULTS_JSON = "experiment1_results.json"
LEARNED_CSV = "learned_weights.csv"
WEIGHT_PNG = "weight_comparison.png"
PER_ATTRIBUTE_PNG = "per_attribute_comparison.png"
DECISIONS_CSV = "inference_decisions.csv"
SCENARIO_CSV = "scenario_metrics.csv"
SCENARIO_COLS = ["scenario", "n_decisions", "n_valid", "agreement", "auc", "frac_A", "weights"]


@dataclass
class Analysis:
    """Metrics (JSON-ready), learned weights (``scenario,b_attr1..5``), the aligned targets (n, 5) and
    one row of metrics per scenario (``SCENARIO_COLS``), which shows in a mix which scenarios have
    left the answer bias while the pooled figures still average them with those that have not."""

    metrics: dict[str, Any]
    learned: pd.DataFrame
    targets: np.ndarray
    per_scenario: pd.DataFrame


class _Unfit(Exception):
    """A scenario whose weights cannot be estimated; the message is the reason reported."""


def _check_decisions(df: pd.DataFrame, source: str) -> pd.DataFrame:
    """Return a copy with numeric attribute columns and integer scenarios; UserError naming bad columns."""
    missing = [c for c in REQUIRED_COLS if c not in df.columns]
    if missing:
        raise UserError(
            f"{source}: missing column(s) {', '.join(missing)}; decisions need "
            "scenario, selection, A_attribute_1..5 and B_attribute_1..5"
        )
    if df.empty:
        raise UserError(f"{source}: has no decisions (no rows)")
    out = df.copy()
    bad = []
    for col in ["scenario", *A_COLS, *B_COLS]:
        values = pd.to_numeric(out[col], errors="coerce").astype(float)
        broken = ~np.isfinite(values)
        if broken.any():
            bad.append(f"{col} (e.g. {out[col][broken].iloc[0]!r})")
        out[col] = values
    if bad:
        raise UserError(f"{source}: non-numeric or empty values in column(s) {', '.join(bad)}; fix or remove those rows")
    scenario = out["scenario"]
    if ((scenario % 1) != 0).any() or (scenario < 0).any():
        raise UserError(f"{source}: column scenario must hold scenario indices 0, 1, 2, ...")
    out["scenario"] = scenario.astype(int)
    return out


def load_decisions(path: str | Path) -> pd.DataFrame:
    """Read a decisions CSV (one row per trial; extra columns kept) and validate its columns."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"decisions file {path} does not exist; run the evaluation first or pass its path")
    try:
        df = pd.read_csv(path)
    except (pd.errors.EmptyDataError, pd.errors.ParserError, UnicodeDecodeError) as e:
        raise UserError(f"{path} is not a readable CSV file: {e}") from None
    return _check_decisions(df, str(path))


def _selections(df: pd.DataFrame) -> np.ndarray:
    """Each answer stripped; non-text (empty cells, NaN) becomes "" so it can never count as A or B."""
    return np.array([s.strip() if isinstance(s, str) else "" for s in df["selection"]], dtype=object)


def rescale(coefs: Sequence[float] | np.ndarray) -> np.ndarray:
    """Scale so the largest |coef| is 100 (signs kept) and round to integers; all-zero stays zero."""
    coefs = np.asarray(coefs, dtype=float)
    largest = np.max(np.abs(coefs))
    if largest == 0:
        return np.zeros_like(coefs)
    return np.round(coefs * 100 / largest) + 0.0  # + 0.0 turns -0.0 into 0.0


def _fit_paper(x: np.ndarray, chose_a: np.ndarray) -> np.ndarray:
    """MAP logistic regression of "chose A" on x with an intercept; the priors keep it finite under separation."""
    design = np.column_stack([np.ones(len(x)), x])
    y = chose_a.astype(float)
    precision = np.array([INTERCEPT_PRIOR_SD, *[SLOPE_PRIOR_SD] * x.shape[1]]) ** -2.0

    def neg_log_posterior(beta: np.ndarray) -> tuple[float, np.ndarray]:
        eta = design @ beta
        value = np.sum(np.logaddexp(0.0, eta) - y * eta) + 0.5 * np.sum(precision * beta**2)
        grad = design.T @ (special.expit(eta) - y) + precision * beta
        return float(value), grad

    result = optimize.minimize(neg_log_posterior, np.zeros(design.shape[1]), jac=True, method="L-BFGS-B")
    return result.x[1:]


def _fit_mle(x: np.ndarray, chose_a: np.ndarray) -> np.ndarray:
    """Maximum-likelihood logit of "chose B" on -x (no intercept); raise _Unfit when the data are separated."""
    model = Logit((~chose_a).astype(float), -x)
    model.raise_on_perfect_prediction = True
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            result = model.fit(disp=0, maxiter=100)
        except (PerfectSeparationError, np.linalg.LinAlgError):
            raise _Unfit(SEPARATION) from None
    coefs = np.asarray(result.params, dtype=float)
    diverged = any(issubclass(w.category, (PerfectSeparationWarning, ConvergenceWarning)) for w in caught)
    if diverged or not result.mle_retvals["converged"] or not np.all(np.abs(coefs) < MLE_MAX_ABS_COEF):
        raise _Unfit(SEPARATION)
    return coefs


def _fit_scenario(x: np.ndarray, chose_a: np.ndarray, regression: str, min_valid: int) -> np.ndarray:
    """Rescaled weights for one scenario's valid answers, or _Unfit with the reason."""
    if len(chose_a) < min_valid:
        raise _Unfit(TOO_FEW)
    if chose_a.all() or not chose_a.any():
        raise _Unfit(ONE_CLASS)
    fit = _fit_paper if regression == "paper" else _fit_mle
    return rescale(fit(x, chose_a))


def _defined(x: np.ndarray, y: np.ndarray) -> bool:
    """A correlation needs at least 3 pairs and variation on both sides."""
    return len(x) >= 3 and np.ptp(x) > 0 and np.ptp(y) > 0


def pearson_r(x: Sequence[float] | np.ndarray, y: Sequence[float] | np.ndarray) -> float | None:
    """Pearson r, or None where it is undefined (fewer than 3 pairs, or a constant side)."""
    x, y = np.asarray(x, dtype=float), np.asarray(y, dtype=float)
    return float(stats.pearsonr(x, y).statistic) if _defined(x, y) else None


def _fisher_ci(r: float, n: int) -> list[float] | None:
    """95% confidence interval of r from the Fisher z transform (needs n > 3)."""
    if n <= 3:
        return None
    z = np.arctanh(np.clip(r, -1 + 1e-15, 1 - 1e-15))
    half = stats.norm.ppf(0.975) / np.sqrt(n - 3)
    return [float(np.tanh(z - half)), float(np.tanh(z + half))]


def pooled_metrics(learned: np.ndarray, targets: np.ndarray) -> dict[str, Any]:
    """Correlation and error metrics over all learned vs target pairs of the fit scenarios."""
    keys = ["r", "p_value", "r_ci95", "spearman", "r_per_attribute", "mean_scenario_r", "mae", "rmse"]
    out: dict[str, Any] = dict.fromkeys(keys)
    out["r_per_attribute"] = [pearson_r(learned[:, k], targets[:, k]) for k in range(N_ATTRIBUTES)]
    per_scenario = [r for l_row, t_row in zip(learned, targets) if (r := pearson_r(l_row, t_row)) is not None]
    out["mean_scenario_r"] = float(np.mean(per_scenario)) if per_scenario else None
    x, y = learned.ravel(), targets.ravel().astype(float)
    if len(x) >= 3:
        out["mae"] = float(np.mean(np.abs(x - y)))
        out["rmse"] = float(np.sqrt(np.mean((x - y) ** 2)))
    if _defined(x, y):
        result = stats.pearsonr(x, y)
        out["r"], out["p_value"] = float(result.statistic), float(result.pvalue)
        out["r_ci95"] = _fisher_ci(out["r"], len(x))
        out["spearman"] = float(stats.spearmanr(x, y).statistic)
    return out


def ranking_auc(scores: np.ndarray, positive: np.ndarray) -> float | None:
    """ROC AUC of ``scores`` for the ``positive`` rows (ties count half); None without both classes."""
    n_pos, n_neg = int(positive.sum()), int((~positive).sum())
    if not n_pos or not n_neg:
        return None
    ranks = stats.rankdata(scores)
    return float((ranks[positive].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


def cut_rule_choices(scenario: Scenario, weights: Sequence[float], a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """The target rule's choices on trials (a, b) when cut to its k heaviest attributes, k = 1..5: shape (5, n).

    A model that acts on only some of a rule's attributes matches the rule cut to those best, so
    comparing its choices with these rows shows which attributes it has picked up before its
    agreement with the full rule (the last row) says much. Ties in |weight| keep the attributes' order.
    """
    order = np.argsort(-np.abs(np.asarray(weights, float)), kind="stable")
    rows = []
    for k in range(1, N_ATTRIBUTES + 1):
        cut = [w if i in order[:k] else 0 for i, w in enumerate(weights)]
        rows.append([target_choice(scenario, cut, ai, bi) for ai, bi in zip(a, b)])
    return np.array(rows, dtype=object)


def analyze(
    decisions: pd.DataFrame,
    scenarios: Sequence[Scenario],
    weights: Sequence[Sequence[int]],
    regression: str = "paper",
    min_valid: int = 10,
) -> Analysis:
    """Fit one regression per scenario present in ``decisions`` and compare the learned weights with ``weights``."""
    if regression not in REGRESSIONS:
        raise UserError(f"regression must be one of {', '.join(REGRESSIONS)}, got {regression!r}")
    if min_valid < 1:
        raise UserError(f"min_valid must be at least 1, got {min_valid}")
    df = _check_decisions(decisions, "decisions")
    known = min(len(scenarios), len(weights))
    unknown = sorted(set(df["scenario"]) - set(range(known)))
    if unknown:
        raise UserError(
            f"decisions name scenario(s) {unknown[:5]} but the scenarios and weights cover only 0..{known - 1}; "
            "pass the scenarios.csv and instilled_weights.csv the decisions were made on"
        )
    selection = _selections(df)
    valid = np.isin(selection, ["A", "B"])
    scenario_of = df["scenario"].to_numpy()
    ids = sorted(int(s) for s in np.unique(scenario_of))
    learned = np.full((len(ids), N_ATTRIBUTES), np.nan)
    dropped, agree, aucs, rows = [], 0, [], []
    top_k, rule_top_k = np.zeros(N_ATTRIBUTES, dtype=int), np.zeros(N_ATTRIBUTES, dtype=int)
    p_b = pd.to_numeric(df["p_b"], errors="coerce").to_numpy(float) if "p_b" in df else None
    a_all, b_all = df[A_COLS].to_numpy(), df[B_COLS].to_numpy()
    for row, s in enumerate(ids):
        mine = scenario_of == s
        rule = np.array([target_choice(scenarios[s], weights[s], ai, bi) for ai, bi in zip(a_all[mine], b_all[mine])])
        ok = valid[mine]
        a, b, chose = a_all[mine][ok], b_all[mine][ok], selection[mine][ok]
        agreed = int((rule[ok] == chose).sum())
        agree += agreed
        cuts = cut_rule_choices(scenarios[s], weights[s], a, b)
        top_k += (cuts == chose).sum(axis=1)
        rule_top_k += (cuts == rule[ok]).sum(axis=1)
        auc = None
        if p_b is not None:  # over every row: P(B) exists whatever the greedy answer was
            has = ~np.isnan(p_b[mine])
            if (auc := ranking_auc(p_b[mine][has], rule[has] == "B")) is not None:
                aucs.append(auc)
        ranges = np.array([attr.hi - attr.lo for attr in scenarios[s].attributes])
        fit_status = "fit"
        try:
            learned[row] = _fit_scenario((a - b) / ranges, chose == "A", regression, min_valid)
        except _Unfit as unfit:
            dropped.append({"scenario": s, "reason": str(unfit)})
            fit_status = str(unfit)
        rows.append([s, int(mine.sum()), int(ok.sum()), agreed / ok.sum() if ok.any() else None, auc,
                     float(np.mean(selection[mine] == "A")), fit_status])
    targets = np.array([weights[s] for s in ids], dtype=float)
    fit = ~np.isnan(learned).any(axis=1)
    n, n_valid = len(df), int(valid.sum())
    metrics = {
        "regression": regression,
        **pooled_metrics(learned[fit], targets[fit]),
        "agreement": agree / n_valid if n_valid else None,
        # Agreement with the rule cut to each scenario's k heaviest attributes (k = 1..5; the last is
        # the full rule), and how far the cut rules themselves agree with the full one (their ceiling).
        "agreement_top_k": (top_k / n_valid).tolist() if n_valid else None,
        "rule_top_k": (rule_top_k / n_valid).tolist() if n_valid else None,
        "parse_failure": (n - n_valid) / n,
        "frac_A": float(np.mean(selection == "A")),
        # How well P(B) ranks each scenario's trials by the target rule (mean over scenarios): 0.5 when
        # P(B) ignores the rule, 1 when it orders them perfectly. It moves before the greedy choices do.
        "auc": float(np.mean(aucs)) if aucs else None,
        "n_decisions": n,
        "n_valid": n_valid,
        "n_scenarios": len(ids),
        "n_scenarios_fit": int(fit.sum()),
        "scenarios_dropped": dropped,
    }
    frame = pd.DataFrame(learned, columns=LEARNED_COLS)
    frame.insert(0, "scenario", ids)
    return Analysis(metrics, frame, targets, pd.DataFrame(rows, columns=SCENARIO_COLS))


def write_analysis(analysis: Analysis, out_dir: str | Path, decisions: pd.DataFrame | None = None) -> list[Path]:
    """Write the metrics JSON, learned weights CSV and both figures (plus the decisions, if given); return the paths."""
    from selfinterp import plots  # here, so computing metrics never needs matplotlib

    out = Path(out_dir)
    learned = analysis.learned[LEARNED_COLS].to_numpy(dtype=float)
    paths = [out / RESULTS_JSON, out / LEARNED_CSV, out / SCENARIO_CSV, out / WEIGHT_PNG, out / PER_ATTRIBUTE_PNG]
    write_json(paths[0], analysis.metrics)
    write_text(paths[1], analysis.learned.to_csv(index=False, float_format="%.0f"))
    write_text(paths[2], analysis.per_scenario.to_csv(index=False, float_format="%.4f"))
    plots.save_figure(plots.weight_comparison_figure(learned, analysis.targets, analysis.metrics["r"]), paths[3])
    plots.save_figure(plots.per_attribute_figure(learned, analysis.targets), paths[4])
    if decisions is not None:
        paths.append(out / DECISIONS_CSV)
        write_text(paths[-1], decisions.to_csv(index=False))
    return paths


def fmt(value: float | None, spec: str, missing: str = "undefined") -> str:
    """A metric formatted with ``spec``, or ``missing`` when it is undefined (None)."""
    return missing if value is None else format(value, spec)


def summary(metrics: dict[str, Any]) -> str:
    """A few lines for people: r with its CI, agreement, parse failures and dropped scenarios."""
    ci = metrics["r_ci95"]
    ci_text = f" [95% CI {ci[0]:.3f}, {ci[1]:.3f}]" if ci else ""
    lines = [
        f"r = {fmt(metrics['r'], '.3f')}{ci_text} (p = {fmt(metrics['p_value'], '.2g')}) over "
        f"{N_ATTRIBUTES * metrics['n_scenarios_fit']} weights from {metrics['n_scenarios_fit']} of "
        f"{metrics['n_scenarios']} scenarios ({metrics['regression']} regression)",
        f"agreement with the target rule: {fmt(metrics['agreement'], '.1%')} of {metrics['n_valid']} valid answers"
        + (f"; P(B) ranks the trials by the rule with AUC {metrics['auc']:.3f}" if metrics.get("auc") is not None else ""),
        f"unparseable answers: {metrics['n_decisions'] - metrics['n_valid']} of {metrics['n_decisions']} "
        f"({metrics['parse_failure']:.1%})",
    ]
    if metrics.get("agreement_top_k"):
        lines.append(f"agreement with the rule cut to its k heaviest attributes, k = 1..{N_ATTRIBUTES}: "
                     + ", ".join(f"{x:.1%}" for x in metrics["agreement_top_k"])
                     + " (the cut rules agree with the full one on "
                     + ", ".join(f"{x:.1%}" for x in metrics["rule_top_k"]) + ")")
    if metrics["scenarios_dropped"]:
        lines.append("dropped: " + ", ".join(f"{d['scenario']} ({d['reason']})" for d in metrics["scenarios_dropped"]))
    return "\n".join(lines)


def analyze_command(
    decisions: str,
    scenarios: str,
    weights: str | None = None,
    regression: str = "paper",
    out: str | None = None,
    min_valid: int = 10,
) -> dict:
    """Recover the weights behind a model's choices and compare them with the instilled ones.

    Writes experiment1_results.json, learned_weights.csv, scenario_metrics.csv (agreement, AUC,
    share of "A" and whether the weights were fit, per scenario), weight_comparison.png,
    per_attribute_comparison.png and inference_decisions.csv (a copy of the decisions, skipped
    when that is the decisions file itself).

    Args:
        decisions: CSV of the model's choices, one row per trial: scenario, selection (A or B;
            anything else counts as unparseable), A_attribute_1..5, B_attribute_1..5.
        scenarios: scenarios.csv of the data folder the decisions were made on.
        weights: instilled_weights.csv with the target weights (default: beside the scenarios file).
        regression: paper (MAP logistic regression with Normal priors, finite under separation) or
            mle (maximum likelihood without intercept; separated scenarios are dropped).
        out: folder for the results (default: the decisions file's folder).
        min_valid: scenarios with fewer valid A/B answers than this are dropped.
    """
    decisions_path = Path(decisions)
    frame = load_decisions(decisions_path)
    weights_path = Path(weights) if weights else Path(scenarios).parent / WEIGHTS_CSV
    analysis = analyze(frame, read_scenarios(scenarios), read_weights(weights_path), regression, min_valid)
    out_dir = Path(out) if out else decisions_path.parent
    same_file = (out_dir / DECISIONS_CSV).resolve() == decisions_path.resolve()
    paths = write_analysis(analysis, out_dir, None if same_file else frame)
    print(summary(analysis.metrics))
    print("wrote " + ", ".join(str(p) for p in paths))
    return analysis.metrics
