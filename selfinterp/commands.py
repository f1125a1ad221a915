"""The `data` and `report` commands: thin wrappers that read arguments and print what they did."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

from selfinterp.analysis import fmt
from selfinterp.dataset import build_data, write_data
from selfinterp.errors import UserError


def data_command(out: str = "data", **build_args: Any) -> list[str]:
    """Write the Experiment 1 data files (scenarios, target weights, train/val/test) into a folder.

    Args:
        out: Output folder.
        **build_args: The data set's parameters (see :func:`selfinterp.dataset.build_data`).
    """
    start = time.perf_counter()
    data = build_data(**build_args)
    paths = write_data(data, out)
    print(f"wrote {len(data.scenarios)} scenarios, {len(data.train)} train / {len(data.val)} val / "
          f"{len(data.test)} test records to {out} in {time.perf_counter() - start:.1f} s")
    return [str(p) for p in paths]


def report_command(results: str = "results") -> str:
    """Print a Markdown table with one row per run found under a results folder.

    Args:
        results: Folder holding the runs' summary.json files (at any depth).
    """
    root = Path(results)
    summaries = sorted(root.rglob("summary.json")) if root.is_dir() else []
    if not summaries:
        raise UserError(f"no summary.json under {root}; train with `python -m selfinterp fit --config ...` first")
    lines = [
        "| Run | Model | Size | Correlation (r) | p-value | Agreement | Parse failures | Epochs |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for path in summaries:
        try:
            summary = json.loads(path.read_text())
            entries = summary["epochs"]
        except (json.JSONDecodeError, KeyError):
            raise UserError(f"{path} is not a selfinterp summary") from None
        if not entries:
            continue
        last = entries[-1]
        trained = [e["epoch"] for e in entries if e["tag"].startswith("epoch_")]
        size = f"{summary.get('n_params', 0) / 1e6:.0f}M"
        lines.append(
            f"| {path.parent.relative_to(root)} | {summary.get('model')} | {size} | {fmt(last.get('r'), '.3f', 'n/a')} | "
            f"{fmt(last.get('p_value'), '.2g', 'n/a')} | {fmt(last.get('agreement'), '.1%', 'n/a')} | "
            f"{fmt(last.get('parse_failure'), '.1%', 'n/a')} | {max(trained) if trained else last['tag']} |"
        )
    table = "\n".join(lines)
    print(table)
    return table
