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
    """Print a Markdown table with one row per run found under a results folder (the last verified epoch of each).

    Args:
        results: Folder holding the runs' summary.json files (at any depth).
    """
    root = Path(results)
    summaries = sorted(root.rglob("summary.json")) if root.is_dir() else []
    if not summaries:
        raise UserError(f"no summary.json under {root}; train with `python -m selfinterp fit --config ...` first")
    lines = [
        "| Run | Model | Size | Scenarios | Train trials / scenario | Epochs | lr | LoRA r | Correlation (r) | p-value | Agreement "
        "| AUC | Parse failures | Share of A | Training min | Machine |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
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
        setup = summary.get("setup") or {}
        trained = [e["epoch"] for e in entries if e["tag"].startswith("epoch_")]
        size = f"{summary.get('n_params', 0) / 1e6:.0f}M"
        rank = "full" if setup.get("full_finetune") else str(summary.get("lora_r", "-"))
        if setup.get("lora_init", "default") != "default":
            rank += f" ({setup['lora_init']} init)"
        if setup.get("lora_standardise"):
            rank += " (standardised inputs)"
        if setup.get("init_from"):
            rank += " (from a checkpoint)"
        scenarios = str(setup.get("n_scenarios", "-"))
        if setup.get("scenario_ids"):
            scenarios += f" (catalog {', '.join(map(str, setup['scenario_ids']))})"
        seconds = last.get("train_seconds")
        trials = fmt(setup.get("train_trials_per_scenario"), ".0f", "-")
        lr = fmt(setup.get("lr"), ".2g", "-")
        if setup.get("lora_b_lr_ratio", 1) != 1:
            lr += f" (B x{setup['lora_b_lr_ratio']:g})"
        if setup.get("optimizer", "AdamW") != "AdamW":
            lr += f" ({setup['optimizer']})"
        if setup.get("mirror_train"):
            trials += " (half mirrors)"
        if setup.get("layout", "blocks") != "blocks":
            trials += f" ({setup['layout']} layout)"
        questions = setup.get("attribute_questions_per_scenario")
        if questions:
            trials += f" + {questions:.0f} questions{' first' if setup.get('curriculum') else ''}"
        lines.append(
            f"| {path.parent.relative_to(root)} | {summary.get('model')} | {size} | {scenarios} | "
            f"{trials} | {max(trained) if trained else last['tag']} | "
            f"{lr} | {rank} | {fmt(last.get('r'), '.3f', 'n/a')} | "
            f"{fmt(last.get('p_value'), '.2g', 'n/a')} | {fmt(last.get('agreement'), '.1%', 'n/a')} | "
            f"{fmt(last.get('auc'), '.3f', 'n/a')} | {fmt(last.get('parse_failure'), '.1%', 'n/a')} | {fmt(last.get('frac_A'), '.1%', 'n/a')} | "
            f"{fmt(None if seconds is None else seconds / 60, '.1f', '-')} | {setup.get('machine', '-')} |"
        )
    table = "\n".join(lines)
    print(table)
    return table
