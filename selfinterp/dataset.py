"""The Experiment 1 data set: built from a catalog and seeds, written to and read from paper-format files.

Files in a data folder:
  scenarios.csv                  scenario,question,attr1..5,attr1_min..5,attr1_max..5 (+ attr1_units..5)
  instilled_weights.csv          scenario,attr1..attr5 (integers, largest |w| = 100)
  instill_100_prefs.jsonl        training records {"messages": [system, user, assistant]}
                                 (curriculum questions carry "stage": 0 as well)
  instill_100_prefs_val.jsonl    validation records
  instill_100_prefs_test.jsonl   held-out test records (seed 7)
  test_trials.csv                the test trials' raw values: scenario,trial,A_attribute_1..5,B_attribute_1..5,target
"""

from __future__ import annotations

import csv
import io
import json
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Sequence

from selfinterp.atomic import write_text
from selfinterp.catalog import N_ATTRIBUTES, Attribute, Scenario, apply_roles, load_catalog
from selfinterp.errors import UserError
from selfinterp.prompts import ATTRIBUTE_PROMPT, DECISION_PROMPT, SYSTEM_PROMPT, chat_messages
from selfinterp.trials import (
    ATTRIBUTE_SEED,
    CONTRAST_SEED,
    TEST_SEED,
    TRAIN_SEED,
    WEIGHTS_SEED,
    AttributeQuestion,
    LAYOUTS,
    Layout,
    Trial,
    draw_attribute_questions,
    draw_contrast_trials,
    draw_trials,
    draw_weights,
    load_roles,
    swapped,
    target_choice,
    trial_text,
)

SCENARIOS_CSV = "scenarios.csv"
WEIGHTS_CSV = "instilled_weights.csv"
TRAIN_JSONL = "instill_100_prefs.jsonl"
VAL_JSONL = "instill_100_prefs_val.jsonl"
TEST_JSONL = "instill_100_prefs_test.jsonl"
TEST_CSV = "test_trials.csv"
ATTRS = range(1, N_ATTRIBUTES + 1)
A_COLS = [f"A_attribute_{i}" for i in ATTRS]
B_COLS = [f"B_attribute_{i}" for i in ATTRS]


@dataclass(frozen=True)
class Record:
    """One chat example: system prompt, user message and the target answer letter.

    ``stage`` is its curriculum stage: 0 for a question about one attribute, 1 for a decision.
    """

    system: str
    user: str
    answer: str
    stage: int = 1

    def messages(self, with_answer: bool = True) -> list[dict[str, str]]:
        return chat_messages(self.system, self.user, self.answer if with_answer else None)


@dataclass
class DecisionData:
    """Everything Experiment 1 needs; ``test`` and ``test_trials`` are aligned row for row."""

    scenarios: list[Scenario]
    weights: list[list[int]]
    train: list[Record]
    val: list[Record]
    test: list[Record]
    test_trials: list[Trial]
    layout: Layout = "blocks"


def build_data(
    n_scenarios: int = 100,
    scenario_ids: list[int] | None = None,
    catalog: str | None = None,
    roles: str | None = None,
    system_prompt: str = SYSTEM_PROMPT,
    decision_prompt: str = DECISION_PROMPT,
    n_train: int = 50,
    n_val: int = 10,
    n_test: int = 50,
    extra_train: int = 0,
    contrast_train: int = 0,
    attribute_train: int = 0,
    mirror_train: bool = False,
    layout: Layout = "blocks",
    attribute_prompt: str = ATTRIBUTE_PROMPT,
    weights: list[list[int]] | None = None,
    weights_seed: int = WEIGHTS_SEED,
    train_seed: int = TRAIN_SEED,
    test_seed: int = TEST_SEED,
    contrast_seed: int = CONTRAST_SEED,
    attribute_seed: int = ATTRIBUTE_SEED,
) -> DecisionData:
    """Generate the data set: weights (seed 1), train+val (seed 2), test (seed 7).

    Per scenario, ``n_train + n_val`` trials are drawn from the seed-2 stream (the first
    ``n_train`` train, the rest validate); ``extra_train`` more training trials per scenario
    continue that stream afterwards, so the paper's records stay unchanged. ``contrast_train``
    adds trials whose options differ in one attribute only (seed 3), after each scenario's others;
    ``attribute_train`` adds questions about one attribute (seed 4, curriculum stage 0) after those.

    Args:
        n_scenarios: Use the first N scenarios of the catalog.
        scenario_ids: Use these scenarios of the catalog (0-based indices) instead of the first
            ``n_scenarios``, numbered 0, 1, ... in the order given. Each keeps the target weights, the
            paper's trials and the test trials it has in the full experiment; its extra, contrast and
            attribute trials are those it gets when the first ``max(scenario_ids) + 1`` are drawn.
        catalog: Scenario catalog JSON (default: the project's own; the paper's candidate_scenarios.json loads too).
        roles: Optional roles CSV without header; shuffled with seed 0, scenario i becomes "Imagine you are <role i>. ...".
        system_prompt: System message of every record.
        decision_prompt: Instruction placed immediately before the trial text in the user message.
        n_train: Training trials per scenario (the paper's 50).
        n_val: Validation trials per scenario, drawn right after the training ones (the paper's 10).
        n_test: Held-out test trials per scenario (seed 7) used for verification.
        extra_train: Extra training trials per scenario, continuing the training stream.
        contrast_train: Extra training trials per scenario whose options differ in one attribute only
            (cycling through the five), labelled by the same rule: easy pairs for the model to start from.
        attribute_train: Training questions per scenario about one attribute ("Which option has the
            higher price?", answered by the values, not the weights): a first curriculum stage that
            teaches reading and comparing the attributes (see ``data.curriculum``).
        mirror_train: Follow every training record with its mirror: the same two options with A and
            B exchanged, labelled by the same rule (so, but for ties, the other letter). Each pair
            differs only in which letter the content sits behind; in one batch (as a fit serves
            them), a model that ignores the content can do no better than P(A) = 1/2 on the pair,
            so a letter bias cannot lower the loss and only the content can.
        layout: How a prompt lists the options' values: "blocks" (the paper's: option A's five
            lines, then option B's), "paired" (one line per attribute with both values side by side)
            or "scores" (the blocks, each value as a whole number 0-100 of its attribute's range,
            without units: fewer digits to read, the same rule).
        attribute_prompt: Instruction placed before an attribute question's text.
        weights: Target weights to instil instead of the seeded draw: one row of five integers in
            [-100, 100] per scenario used, in the order of ``scenario_ids`` (or the first
            ``n_scenarios``). Every trial keeps its values; only the labels follow these weights.
        weights_seed: Seed of the target weights (when ``weights`` is not given).
        train_seed: Seed of the training and validation trials.
        test_seed: Seed of the held-out test trials.
        contrast_seed: Seed of the one-attribute contrast trials.
        attribute_seed: Seed of the attribute questions.
    """
    for name, value in [("n_scenarios", n_scenarios), ("n_train", n_train), ("n_test", n_test)]:
        if value < 1:
            raise UserError(f"{name} must be at least 1, got {value}")
    if min(n_val, extra_train, contrast_train, attribute_train) < 0:
        raise UserError("n_val, extra_train, contrast_train and attribute_train must not be negative")
    scenarios = load_catalog(catalog)
    if scenario_ids is not None:
        bad = [i for i in scenario_ids if not 0 <= i < len(scenarios)]
        if not scenario_ids or bad or len(set(scenario_ids)) < len(scenario_ids):
            raise UserError(f"scenario_ids={list(scenario_ids)}: give distinct indices between 0 and "
                            f"{len(scenarios) - 1} (the catalog's scenarios)")
        n_scenarios = max(scenario_ids) + 1
    if n_scenarios > len(scenarios):
        raise UserError(f"n_scenarios={n_scenarios} but the catalog has only {len(scenarios)} scenarios")
    scenarios = scenarios[:n_scenarios]
    if roles:
        scenarios = apply_roles(scenarios, load_roles(roles))
    used = scenario_ids if scenario_ids is not None else list(range(n_scenarios))
    weights = _with_given_weights(draw_weights(len(scenarios), weights_seed), weights, used)
    paper = draw_trials(scenarios, weights, n_train + n_val, train_seed)
    extra = draw_trials(scenarios, weights, extra_train, None) if extra_train else [[] for _ in scenarios]
    contrast = draw_contrast_trials(scenarios, weights, contrast_train, contrast_seed)
    questions = draw_attribute_questions(scenarios, attribute_train, attribute_seed)
    test = draw_trials(scenarios, weights, n_test, test_seed)
    if scenario_ids is not None:
        scenarios, weights = [scenarios[i] for i in scenario_ids], [weights[i] for i in scenario_ids]
        paper, extra, contrast, test = ([[replace(t, scenario=k) for t in per[i]] for k, i in enumerate(scenario_ids)]
                                        for per in (paper, extra, contrast, test))
        questions = [[replace(q, trial=replace(q.trial, scenario=k)) for q in questions[i]]
                     for k, i in enumerate(scenario_ids)]
    decided = [ts[:n_train] + more + easy for ts, more, easy in zip(paper, extra, contrast)]  # per scenario
    if mirror_train:
        decided = [[u for t in ts for u in (t, swapped(t, target_choice(s, w, t.b, t.a)))]
                   for s, w, ts in zip(scenarios, weights, decided)]
        flip = {"A": "B", "B": "A"}  # the asked-about values always differ
        questions = [[u for q in qs for u in (q, replace(q, trial=swapped(q.trial, flip[q.trial.label])))]
                     for qs in questions]
    val_trials = [t for ts in paper for t in ts[n_train:]]
    test_trials = [t for ts in test for t in ts]
    seen = {(t.scenario, t.a, t.b) for t in val_trials}
    seen |= {(t.scenario, t.a, t.b) for ts, qs in zip(decided, questions) for t in ts + [q.trial for q in qs]}
    clash = [t for t in test_trials if (t.scenario, t.a, t.b) in seen]
    if clash:
        raise RuntimeError(f"{len(clash)} test trials equal training trials; choose another test seed")

    def records(trials: Sequence[Trial]) -> list[Record]:
        return [Record(system_prompt, decision_prompt + trial_text(scenarios[t.scenario], t, layout=layout), t.label) for t in trials]

    def asked(scenario: Scenario, qs: Sequence[AttributeQuestion]) -> list[Record]:
        return [Record(system_prompt, attribute_prompt + trial_text(scenario, q.trial, q.question(scenario), layout),
                       q.trial.label, stage=0) for q in qs]

    train = [r for s, ts, qs in zip(scenarios, decided, questions) for r in records(ts) + asked(s, qs)]
    return DecisionData(scenarios, weights, train, records(val_trials), records(test_trials), test_trials, layout)


def _with_given_weights(drawn: list[list[int]], given: Any, used: Sequence[int]) -> list[list[int]]:
    """``drawn`` with row ``used[k]`` replaced by ``given[k]``; ``given`` is checked first (None: ``drawn``)."""
    if given is None:
        return drawn
    fix = (f"give one row of {N_ATTRIBUTES} integers between -100 and 100, not all 0, for each of the {len(used)} "
           f"scenario(s) used, in the order of data.scenario_ids (or the first data.n_scenarios)")
    if not isinstance(given, (list, tuple)) or len(given) != len(used):
        raise UserError(f"data.weights: {fix}; got {given!r}")
    for k, row in enumerate(given):
        ok = (isinstance(row, (list, tuple)) and len(row) == N_ATTRIBUTES
              and all(isinstance(w, int) and not isinstance(w, bool) and -100 <= w <= 100 for w in row) and any(row))
        if not ok:
            raise UserError(f"data.weights: row {k} is {row!r}; {fix}")
    weights = [list(w) for w in drawn]
    for i, row in zip(used, given):
        weights[i] = list(row)
    return weights


def _csv_text(header: list[str], rows: list[list[Any]]) -> str:
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(header)
    writer.writerows(rows)
    return buf.getvalue()


def _jsonl_text(records: Sequence[Record]) -> str:
    return "".join(json.dumps({"messages": r.messages(), **({"stage": r.stage} if r.stage != 1 else {})}) + "\n"
                   for r in records)


def write_data(data: DecisionData, out: str | Path) -> list[Path]:
    """Write every file of the data set into ``out`` (each atomically); return their paths."""
    out = Path(out)
    header = (
        ["scenario", "question"]
        + [f"attr{i}" for i in ATTRS]
        + [f"attr{i}_min" for i in ATTRS]
        + [f"attr{i}_max" for i in ATTRS]
        + [f"attr{i}_units" for i in ATTRS]
    )
    rows = [
        [k, s.question, *s.names, *(a.lo for a in s.attributes), *(a.hi for a in s.attributes),
         *(a.units for a in s.attributes)]
        for k, s in enumerate(data.scenarios)
    ]
    files = {
        SCENARIOS_CSV: _csv_text(header, rows),
        WEIGHTS_CSV: _csv_text(["scenario", *(f"attr{i}" for i in ATTRS)], [[k, *w] for k, w in enumerate(data.weights)]),
        TRAIN_JSONL: _jsonl_text(data.train),
        VAL_JSONL: _jsonl_text(data.val),
        TEST_JSONL: _jsonl_text(data.test),
        TEST_CSV: _csv_text(
            ["scenario", "trial", *A_COLS, *B_COLS, "target"],
            [[t.scenario, j, *t.a, *t.b, t.label] for j, t in enumerate(data.test_trials)],
        ),
    }
    for name, text in files.items():
        write_text(out / name, text)
    return [out / name for name in files]


def _read_csv(path: Path, required: Sequence[str]) -> list[dict[str, str]]:
    if not path.is_file():
        raise UserError(f"{path} does not exist; write the data folder with `python -m selfinterp data --out {path.parent}`")
    with path.open(newline="", encoding="utf-8") as f:
        reader = csv.DictReader(f)
        missing = [c for c in required if c not in (reader.fieldnames or [])]
        if missing:
            raise UserError(f"{path}: missing column(s) {', '.join(missing)}")
        return list(reader)


def _number(value: str, where: str) -> float:
    try:
        return float(value)
    except (TypeError, ValueError):
        raise UserError(f"{where}: {value!r} is not a number") from None


def read_scenarios(path: str | Path) -> list[Scenario]:
    """Read ``scenarios.csv`` (paper layout; units columns optional), ordered by scenario index."""
    path = Path(path)
    cols = ["scenario", "question", *(f"attr{i}" for i in ATTRS), *(f"attr{i}_min" for i in ATTRS),
            *(f"attr{i}_max" for i in ATTRS)]
    scenarios = []
    for n, row in enumerate(_read_csv(path, cols)):
        where = f"{path}, row {n + 2}"
        if _number(row["scenario"], where) != n:
            raise UserError(f"{where}: scenarios must be numbered 0, 1, 2, ... in order")
        attrs = tuple(
            Attribute(row[f"attr{i}"], row.get(f"attr{i}_units") or "",
                      _number(row[f"attr{i}_min"], where), _number(row[f"attr{i}_max"], where))
            for i in ATTRS
        )
        if any(not a.lo < a.hi for a in attrs):
            raise UserError(f"{where}: every attribute needs min < max")
        scenarios.append(Scenario(f"scenario_{n}", row["question"], attrs))
    return scenarios


def read_weights(path: str | Path) -> list[list[int]]:
    """Read ``instilled_weights.csv``, ordered by scenario index."""
    path = Path(path)
    rows = _read_csv(path, ["scenario", *(f"attr{i}" for i in ATTRS)])
    return [[int(_number(r[f"attr{i}"], f"{path}, row {n + 2}")) for i in ATTRS] for n, r in enumerate(rows)]


def read_records(path: str | Path) -> list[Record]:
    """Read a JSONL file of ``{"messages": [...]}`` chat examples whose last message is the answer."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{path} does not exist; write the data folder with `python -m selfinterp data --out {path.parent}`")
    records = []
    with path.open(encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            where = f"{path}, line {n}"
            try:
                item = json.loads(line)
                msgs, stage = item["messages"], item.get("stage", 1)
            except (json.JSONDecodeError, KeyError, TypeError, AttributeError):
                msgs, stage = None, 1
            if not isinstance(msgs, list):
                raise UserError(f'{where}: expected a JSON object {{"messages": [...]}}')
            if stage not in (0, 1) or isinstance(stage, bool):
                raise UserError(f'{where}: "stage" must be 0 (attribute question) or 1 (decision), got {stage!r}')
            roles = [m.get("role") if isinstance(m, dict) else None for m in msgs]
            if roles not in (["system", "user", "assistant"], ["user", "assistant"]):
                raise UserError(f"{where}: messages must be [system,] user, assistant; got roles {roles}")
            content = [m.get("content") for m in msgs]
            if not all(isinstance(c, str) for c in content):
                raise UserError(f"{where}: every message needs a string 'content'")
            system = content[0] if len(content) == 3 else ""
            records.append(Record(system, content[-2], content[-1], stage))
    return records


def read_test_trials(path: str | Path) -> list[Trial]:
    """Read ``test_trials.csv``."""
    path = Path(path)
    rows = _read_csv(path, ["scenario", *A_COLS, *B_COLS, "target"])
    trials = []
    for n, r in enumerate(rows):
        where = f"{path}, row {n + 2}"
        if r["target"] not in ("A", "B"):
            raise UserError(f"{where}: target must be A or B, got {r['target']!r}")
        trials.append(Trial(int(_number(r["scenario"], where)), tuple(_number(r[c], where) for c in A_COLS),
                            tuple(_number(r[c], where) for c in B_COLS), r["target"]))
    return trials


def read_data(folder: str | Path) -> DecisionData:
    """Read a data folder written by :func:`write_data` (or the paper's files plus a test set)."""
    folder = Path(folder)
    if not folder.is_dir():
        raise UserError(f"data folder {folder} does not exist; create it with `python -m selfinterp data --out {folder}`")
    scenarios = read_scenarios(folder / SCENARIOS_CSV)
    weights = read_weights(folder / WEIGHTS_CSV)
    if len(weights) != len(scenarios):
        raise UserError(f"{folder}: {len(scenarios)} scenarios but {len(weights)} weight rows")
    test, test_trials = read_records(folder / TEST_JSONL), read_test_trials(folder / TEST_CSV)
    if len(test) != len(test_trials):
        raise UserError(f"{folder}: {TEST_JSONL} has {len(test)} records but {TEST_CSV} has {len(test_trials)} rows")
    bad = [t.scenario for t in test_trials if not 0 <= t.scenario < len(scenarios)]
    if bad:
        raise UserError(f"{folder}/{TEST_CSV}: scenario {bad[0]} is not in {SCENARIOS_CSV}")
    val = read_records(folder / VAL_JSONL) if (folder / VAL_JSONL).is_file() else []
    # the layout the records were written in (self-report prompts must match it): the one test record 0 ends with, else blocks
    first = test_trials[0] if test_trials else None
    layout = next((name for name in LAYOUTS if first is not None
                   and test[0].user.endswith(trial_text(scenarios[first.scenario], first, layout=name))), "blocks")
    return DecisionData(scenarios, weights, read_records(folder / TRAIN_JSONL), val, test, test_trials, layout)
