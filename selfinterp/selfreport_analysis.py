"""Experiment 2 analysis: how well a model's reports of its own weights match the weights it acts on.

A report is the model's answer to a report prompt: a JSON object giving, for each of the five
attributes of a scenario, how heavily it weighs that attribute (-100..100). Per model version
(``instilled``: with the adapter; ``base``: without it), the valid reports are averaged per
scenario x attribute, the mean reports and the learned weights (the Experiment 1 regression on
the same model's choices) are each z-scored over all scenario x attribute pairs they share, and
the report accuracy is the Pearson r between the two, with a 95% confidence interval
(Plunkett et al. 2025, Experiment 2). The same r against the target (instilled) weights and the
share of invalid reports are reported beside it.

The base model's reports are compared with the same learned weights (those of the fine-tuned
model): that is the control, i.e. how much of the report accuracy a model gets without having
learned the preferences (from common sense about the attributes, say).

No torch here: reports made anywhere can be scored from files.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Sequence

import numpy as np
import pandas as pd

from selfinterp.analysis import LEARNED_COLS, fmt, pooled_metrics
from selfinterp.atomic import write_json, write_text
from selfinterp.catalog import N_ATTRIBUTES
from selfinterp.dataset import A_COLS, B_COLS, read_weights
from selfinterp.errors import UserError

if TYPE_CHECKING:
    from matplotlib.figure import Figure

REPORT_COLS = [f"report_attr{i}" for i in range(1, N_ATTRIBUTES + 1)]
REPORTS_COLUMNS = ["explaining_model", "version", "scenario", *REPORT_COLS, *A_COLS, *B_COLS, "raw"]
REPORTS_CSV = "weight_reports.csv"
RESULTS_JSON = "experiment2_results.json"
REPORT_PNG = "report_vs_learned.png"
INSTILLED = "instilled"
BASE = "base"

NOT_AN_OBJECT = "not one JSON object"
DUPLICATE_KEY = "duplicate key"
WRONG_KEYS = "keys are not the five attribute names"
NOT_NUMERIC = "non-numeric value"


@dataclass(frozen=True)
class ParsedReport:
    """A parsed answer: the five weights in attribute order, or None and the reason it is invalid."""

    weights: tuple[float, ...] | None
    reason: str = ""

    @property
    def valid(self) -> bool:
        return self.weights is not None


class _Duplicate(ValueError):
    pass


def _no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    keys = [k for k, _ in pairs]
    if len(set(keys)) != len(keys):
        raise _Duplicate
    return dict(pairs)


def _reject_constant(name: str) -> float:
    raise ValueError(f"{name} is not a JSON number")


def parse_report(text: str, names: Sequence[str]) -> ParsedReport:
    """Parse a self-report strictly: the whole answer, stripped, must be one JSON object.

    Valid means: ``json.loads`` of the stripped answer is an object whose keys are exactly the
    five attribute ``names`` (any order, no duplicates, names spelled exactly as in the prompt)
    and whose values are finite JSON numbers (``true``/``false``, ``"50"``, ``null``, ``NaN`` and
    ``Infinity`` are not). Values outside -100..100 stay valid: the scale is a request, and the
    analysis z-scores the reports anyway.

    Anything around the object makes the answer invalid, including a Markdown code fence
    (```` ```json ... ``` ````). The prompt asks for the JSON object *only*; accepting fences, or
    fishing an object out of surrounding prose, would be a lenient parser whose invalid-report
    rate could not be compared with the authors' (they dropped 43% of GPT-4o-mini's reports under
    a strict rule), and the rate of answers that follow the format is itself a result.
    """
    try:
        obj = json.loads(text.strip(), object_pairs_hook=_no_duplicates, parse_constant=_reject_constant)
    except _Duplicate:
        return ParsedReport(None, DUPLICATE_KEY)
    except (ValueError, RecursionError):
        return ParsedReport(None, NOT_AN_OBJECT)
    if not isinstance(obj, dict):
        return ParsedReport(None, NOT_AN_OBJECT)
    if set(obj) != set(names) or len(obj) != len(names):
        return ParsedReport(None, WRONG_KEYS)
    values = [obj[name] for name in names]
    if not all(isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) for v in values):
        return ParsedReport(None, NOT_NUMERIC)
    return ParsedReport(tuple(float(v) for v in values))


# Reading ---------------------------------------------------------------------------------------
def _read_csv(path: str | Path, what: str, hint: str) -> pd.DataFrame:
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{what} file {path} does not exist; {hint}")
    try:
        return pd.read_csv(path, keep_default_na=False, na_values=[""], dtype=str)
    except (pd.errors.EmptyDataError, pd.errors.ParserError, UnicodeDecodeError) as e:
        raise UserError(f"{path} is not a readable CSV file: {e}") from None


def _numeric(df: pd.DataFrame, cols: Sequence[str], source: str, allow_empty: bool) -> None:
    """Turn ``cols`` into floats in place; UserError naming the columns with text (or empty cells)."""
    bad = []
    for col in cols:
        values = pd.to_numeric(df[col], errors="coerce").astype(float)
        broken = df[col].notna() & ~np.isfinite(values)
        if not allow_empty:
            broken |= df[col].isna()
        if broken.any():
            bad.append(f"{col} (e.g. {df[col][broken].iloc[0]!r})")
        df[col] = values
    if bad:
        raise UserError(f"{source}: non-numeric{'' if allow_empty else ' or empty'} values in column(s) {', '.join(bad)}")


def _scenarios(df: pd.DataFrame, source: str) -> None:
    _numeric(df, ["scenario"], source, allow_empty=False)
    scenario = df["scenario"]
    if ((scenario % 1) != 0).any() or (scenario < 0).any():
        raise UserError(f"{source}: column scenario must hold scenario indices 0, 1, 2, ...")
    df["scenario"] = scenario.astype(int)


def check_reports(df: pd.DataFrame, source: str = "reports") -> pd.DataFrame:
    """A validated copy of a reports table: integer scenarios, float reports (NaN = invalid report).

    Needs ``scenario`` and ``report_attr1..5``; ``version`` (default ``instilled``) and
    ``explaining_model`` (default empty) are optional, other columns are kept.
    """
    missing = [c for c in ["scenario", *REPORT_COLS] if c not in df.columns]
    if missing:
        raise UserError(f"{source}: missing column(s) {', '.join(missing)}; reports need scenario and "
                        "report_attr1..5 (empty where the report was invalid), optionally explaining_model and version")
    if df.empty:
        raise UserError(f"{source}: has no reports (no rows)")
    out = df.copy()
    _scenarios(out, source)
    _numeric(out, REPORT_COLS, source, allow_empty=True)
    for col, default in [("version", INSTILLED), ("explaining_model", "")]:
        out[col] = out[col].fillna(default).astype(str) if col in out.columns else default
    return out


def load_reports(path: str | Path) -> pd.DataFrame:
    """Read and validate a ``weight_reports.csv`` (see :func:`check_reports`)."""
    df = _read_csv(path, "reports", "write it with `python -m selfinterp report-weights --config ...` or pass its path")
    return check_reports(df, str(path))


def load_learned(path: str | Path) -> pd.DataFrame:
    """Read ``learned_weights.csv`` (``scenario,b_attr1..5``; empty cells = a scenario without weights)."""
    df = _read_csv(path, "learned weights", "run the Experiment 1 analysis (`python -m selfinterp analyze ...`) first")
    missing = [c for c in ["scenario", *LEARNED_COLS] if c not in df.columns]
    if missing:
        raise UserError(f"{path}: missing column(s) {', '.join(missing)}; learned weights need scenario,b_attr1..b_attr5")
    _scenarios(df, str(path))
    _numeric(df, LEARNED_COLS, str(path), allow_empty=True)
    if df["scenario"].duplicated().any():
        raise UserError(f"{path}: scenario {df['scenario'][df['scenario'].duplicated()].iloc[0]} appears twice")
    return df[["scenario", *LEARNED_COLS]]


# Metrics ---------------------------------------------------------------------------------------
@dataclass
class ReportAnalysis:
    """Metrics (JSON-ready) and, per group, the z-scored mean reports and learned weights that were compared."""

    metrics: dict[str, Any]
    compared: dict[str, tuple[np.ndarray, np.ndarray]]


def zscore(values: np.ndarray) -> np.ndarray:
    """(x - mean) / sd over every entry (population sd); all zeros when the entries are constant."""
    values = np.asarray(values, dtype=float)
    if values.size == 0:
        return values
    sd = values.std()
    return (values - values.mean()) / sd if sd > 0 else np.zeros_like(values)


def mean_reports(reports: pd.DataFrame) -> pd.DataFrame:
    """The valid reports of one group averaged per scenario: ``scenario, report_attr1..5, n_valid``."""
    valid = reports[reports[REPORT_COLS].notna().all(axis=1)]
    means = valid.groupby("scenario", sort=True)[REPORT_COLS].mean()
    means["n_valid"] = valid.groupby("scenario").size()
    return means.reset_index()


def _correlation(x: np.ndarray, y: np.ndarray, prefix: str) -> dict[str, Any]:
    """Pearson r with p-value and 95% CI (plus Spearman, per attribute) of two (n, 5) arrays, keys prefixed."""
    pooled = pooled_metrics(x, y) if len(x) else dict.fromkeys(["r", "p_value", "r_ci95", "spearman", "r_per_attribute"])
    return {
        prefix: pooled["r"],
        f"{prefix}_ci95": pooled["r_ci95"],
        f"{prefix}_p_value": pooled["p_value"],
        f"{prefix}_spearman": pooled["spearman"],
        f"{prefix}_per_attribute": pooled["r_per_attribute"],
        f"{prefix}_n_pairs": int(x.size),
    }


def _group_metrics(
    reports: pd.DataFrame, learned: pd.DataFrame, weights: Sequence[Sequence[float]] | None
) -> tuple[dict[str, Any], tuple[np.ndarray, np.ndarray]]:
    means = mean_reports(reports)
    n, n_valid = len(reports), int(reports[REPORT_COLS].notna().all(axis=1).sum())
    fit = learned.dropna(subset=LEARNED_COLS)
    both = means.merge(fit, on="scenario", how="inner")
    z_reports = zscore(both[REPORT_COLS].to_numpy(float))
    z_learned = zscore(both[LEARNED_COLS].to_numpy(float))
    metrics: dict[str, Any] = {
        "explaining_model": str(reports["explaining_model"].iloc[0]),
        "version": str(reports["version"].iloc[0]),
        **_correlation(z_reports, z_learned, "report_accuracy"),
        "n_scenarios_compared": len(both),
    }
    if weights is not None:
        known = means[means["scenario"] < len(weights)]
        if len(known) < len(means):
            raise UserError(f"the reports name scenario {int(means['scenario'].max())} but the target weights "
                            f"cover only 0..{len(weights) - 1}; pass the instilled_weights.csv the model was trained on")
        targets = np.array([weights[s] for s in known["scenario"]], dtype=float).reshape(-1, N_ATTRIBUTES)
        metrics.update(_correlation(zscore(known[REPORT_COLS].to_numpy(float)), zscore(targets), "target_r"))
    metrics.update({
        "invalid_rate": (n - n_valid) / n,
        "n_reports": n,
        "n_valid": n_valid,
        "n_invalid": n - n_valid,
        "n_scenarios": int(reports["scenario"].nunique()),
        "n_scenarios_reported": len(means),
        "min_valid_per_scenario": int(
            reports.assign(ok=reports[REPORT_COLS].notna().all(axis=1)).groupby("scenario")["ok"].sum().min()),
    })
    return metrics, (z_learned, z_reports)


def analyze_reports(
    reports: pd.DataFrame, learned: pd.DataFrame, weights: Sequence[Sequence[float]] | None = None
) -> ReportAnalysis:
    """Report accuracy per group of reports (one group per version, per explaining model if several).

    The top-level ``report_accuracy`` (and its CI, target r and invalid rate) is that of the
    ``instilled`` group when there is one, else of the first group; every group's figures are
    under ``groups``. Scenarios without a valid report or without learned weights are left out
    of the correlation (``n_scenarios_compared`` says how many remain).
    """
    reports = check_reports(reports)
    several_models = reports["explaining_model"].nunique() > 1
    keys = reports["explaining_model"] + "/" + reports["version"] if several_models else reports["version"]
    groups: dict[str, Any] = {}
    compared: dict[str, tuple[np.ndarray, np.ndarray]] = {}
    for key in dict.fromkeys(keys):  # first-appearance order
        groups[key], compared[key] = _group_metrics(reports[keys == key], learned, weights)
    primary = next((k for k in groups if groups[k]["version"] == INSTILLED), next(iter(groups)))
    top = groups[primary]
    metrics = {
        "primary": primary,
        **{k: top[k] for k in ["report_accuracy", "report_accuracy_ci95", "report_accuracy_p_value"]},
        "target_r": top.get("target_r"),
        "target_r_ci95": top.get("target_r_ci95"),
        "invalid_rate": top["invalid_rate"],
        "zscore": "mean reports and learned weights z-scored within each group over the compared scenario x attribute pairs",
        "groups": groups,
    }
    return ReportAnalysis(metrics, compared)


# Output ----------------------------------------------------------------------------------------
def report_figure(analysis: ReportAnalysis) -> Figure:
    """One panel per group: z-scored mean report (y) against z-scored learned weight (x), r in the title."""
    from selfinterp import plots  # here, so computing metrics never needs matplotlib

    n = len(analysis.compared)
    fig, axes = plots.plt.subplots(1, n, figsize=(4.6 * n, 4.6), squeeze=False)
    values = [v for pair in analysis.compared.values() for v in pair if v.size]
    lim = max([3.0, *(float(np.abs(v).max()) * 1.05 for v in values)])
    for ax, (key, (z_learned, z_reports)) in zip(axes[0], analysis.compared.items()):
        m = analysis.metrics["groups"][key]
        ax.plot([-lim, lim], [-lim, lim], color="grey", linestyle="--", linewidth=1)
        ax.scatter(z_learned.ravel(), z_reports.ravel(), s=12, alpha=0.6)
        ax.set_xlim(-lim, lim)
        ax.set_ylim(-lim, lim)
        ax.set_aspect("equal")
        ax.set_xlabel("learned weight (z)")
        ax.set_ylabel("mean reported weight (z)")
        r = m["report_accuracy"]
        ax.set_title(f"{key}: {'r undefined' if r is None else f'r = {r:.3f}'}\n"
                     f"{m['n_scenarios_compared']} scenarios, {m['invalid_rate']:.0%} invalid reports")
    fig.tight_layout()
    return fig


def write_report_analysis(analysis: ReportAnalysis, out_dir: str | Path) -> list[Path]:
    """Write experiment2_results.json and report_vs_learned.png into ``out_dir``; return their paths."""
    from selfinterp import plots

    out = Path(out_dir)
    paths = [out / RESULTS_JSON, out / REPORT_PNG]
    write_json(paths[0], analysis.metrics)
    plots.save_figure(report_figure(analysis), paths[1])
    return paths


def write_reports(reports: pd.DataFrame, path: str | Path) -> Path:
    """Write a reports table in the authors' column order (plus ``raw``), atomically."""
    write_text(path, reports[REPORTS_COLUMNS].to_csv(index=False))
    return Path(path)


def summary(metrics: dict[str, Any]) -> str:
    """One line per group: report accuracy with its CI, r against the targets, invalid reports."""
    lines = []
    for key, m in metrics["groups"].items():
        ci = m["report_accuracy_ci95"]
        target = f"; r vs target weights = {fmt(m['target_r'], '.3f')}" if "target_r" in m else ""
        lines.append(
            f"{key}: report accuracy r = {fmt(m['report_accuracy'], '.3f')}"
            + (f" [95% CI {ci[0]:.3f}, {ci[1]:.3f}]" if ci else "")
            + f" over {m['report_accuracy_n_pairs']} weights of {m['n_scenarios_compared']} scenarios{target}; "
            f"invalid reports {m['n_invalid']} of {m['n_reports']} ({m['invalid_rate']:.1%})"
        )
    return "\n".join(lines)


def analyze_reports_command(reports: str, learned: str, weights: str | None = None, out: str | None = None) -> dict:
    """Score a model's reports of its own weights against the weights it acts on (Experiment 2).

    Writes experiment2_results.json (``report_accuracy``: Pearson r of the z-scored mean reports
    and learned weights, with its 95% CI; r against the target weights; invalid-report rate; the
    same per version under ``groups``) and report_vs_learned.png.

    Args:
        reports: weight_reports.csv: explaining_model, version, scenario, report_attr1..5 (empty
            where the report was invalid), A_attribute_1..5, B_attribute_1..5, raw.
        learned: learned_weights.csv of the Experiment 1 analysis of the same model's choices
            (scenario, b_attr1..b_attr5).
        weights: instilled_weights.csv with the target weights (optional; adds r against them).
        out: folder for the results (default: the reports file's folder).
    """
    analysis = analyze_reports(load_reports(reports), load_learned(learned), read_weights(weights) if weights else None)
    paths = write_report_analysis(analysis, Path(out) if out else Path(reports).parent)
    print(summary(analysis.metrics))
    print("wrote " + ", ".join(str(p) for p in paths))
    return analysis.metrics
