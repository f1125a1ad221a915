"""The `data` and `report` commands: thin wrappers that read arguments and print what they did."""

from __future__ import annotations

import json
import time
from pathlib import Path

from selfinterp.dataset import build_data, write_data
from selfinterp.errors import UserError
from selfinterp.prompts import DECISION_PROMPT, SYSTEM_PROMPT
from selfinterp.trials import TEST_SEED, TRAIN_SEED, WEIGHTS_SEED


def data_command(
    out: str = "data",
    n_scenarios: int = 100,
    catalog: str | None = None,
    roles: str | None = None,
    system_prompt: str = SYSTEM_PROMPT,
    decision_prompt: str = DECISION_PROMPT,
    n_train: int = 50,
    n_val: int = 10,
    n_test: int = 50,
    extra_train: int = 0,
    weights_seed: int = WEIGHTS_SEED,
    train_seed: int = TRAIN_SEED,
    test_seed: int = TEST_SEED,
) -> list[str]:
    """Write the Experiment 1 data files (scenarios, target weights, train/val/test) into a folder.

    Args:
        out: Output folder.
        n_scenarios: Use the first N scenarios of the catalog.
        catalog: Scenario catalog JSON (default: the project's own; the paper's candidate_scenarios.json loads too).
        roles: Optional roles CSV without header; shuffled with seed 0, one role per scenario.
        system_prompt: System message of every record.
        decision_prompt: Instruction placed immediately before the trial text in the user message.
        n_train: Training trials per scenario.
        n_val: Validation trials per scenario (drawn right after the training ones).
        n_test: Held-out test trials per scenario.
        extra_train: Extra training trials per scenario, continuing the training stream.
        weights_seed: Seed of the target weights.
        train_seed: Seed of the training and validation trials.
        test_seed: Seed of the held-out test trials.
    """
    start = time.perf_counter()
    data = build_data(
        n_scenarios=n_scenarios, catalog=catalog, roles=roles, system_prompt=system_prompt,
        decision_prompt=decision_prompt, n_train=n_train, n_val=n_val, n_test=n_test, extra_train=extra_train,
        weights_seed=weights_seed, train_seed=train_seed, test_seed=test_seed,
    )
    paths = write_data(data, out)
    print(f"wrote {len(data.scenarios)} scenarios, {len(data.train)} train / {len(data.val)} val / "
          f"{len(data.test)} test records to {out} in {time.perf_counter() - start:.1f} s")
    return [str(p) for p in paths]


def _fmt(value: float | None, spec: str) -> str:
    return "n/a" if value is None else format(value, spec)


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
            f"| {path.parent.relative_to(root)} | {summary.get('model')} | {size} | {_fmt(last.get('r'), '.3f')} | "
            f"{_fmt(last.get('p_value'), '.2g')} | {_fmt(last.get('agreement'), '.1%')} | "
            f"{_fmt(last.get('parse_failure'), '.1%')} | {max(trained) if trained else last['tag']} |"
        )
    table = "\n".join(lines)
    print(table)
    return table
