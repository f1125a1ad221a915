"""Seeded generation of target weights and decision trials (the paper's algorithm, exactly).

All randomness is Python's ``random`` module, reseeded at each stage, so the authors' catalog
and roles reproduce the authors' files record for record.
"""

from __future__ import annotations

import csv
import math
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Literal, Sequence, get_args

from selfinterp.catalog import N_ATTRIBUTES, Attribute, Scenario
from selfinterp.errors import UserError

WEIGHTS_SEED = 1
TRAIN_SEED = 2
TEST_SEED = 7
CONTRAST_SEED = 3
ATTRIBUTE_SEED = 4
ROLES_SEED = 0


@dataclass(frozen=True)
class Trial:
    """One choice between options A and B of a scenario, labelled by the target rule."""

    scenario: int
    a: tuple[float, ...]
    b: tuple[float, ...]
    label: str  # "A" or "B"


def load_roles(path: str | Path) -> list[str]:
    """Read a roles CSV (no header: every row is a role) and shuffle it with seed 0."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"roles file {path} does not exist")
    with path.open(newline="", encoding="utf-8") as f:
        roles = [row[0] for row in csv.reader(f) if row]
    if not roles:
        raise UserError(f"roles file {path} has no rows")
    random.seed(ROLES_SEED)
    random.shuffle(roles)
    return roles


def draw_weights(n_scenarios: int, seed: int = WEIGHTS_SEED) -> list[list[int]]:
    """Target weights: 5 uniform(-100, 100) draws per scenario, scaled so the largest |w| is 100."""
    random.seed(seed)
    weights = []
    for _ in range(n_scenarios):
        raw = [random.uniform(-100, 100) for _ in range(N_ATTRIBUTES)]
        m = max(raw, key=abs)  # first on ties
        sign = 1 if m > 0 else -1
        weights.append([round(v * 100 * sign / m) for v in raw])
    return weights


def decimals(attr: Attribute) -> int:
    """Decimal places an attribute's values are rounded to, from the width of its range."""
    width = attr.hi - attr.lo
    if width >= 5:
        return 0
    if width >= 1:
        return 1
    return abs(math.floor(math.log10(width))) + 1


def draw_option(scenario: Scenario) -> tuple[float, ...]:
    """One option's five values, each uniform on its range and rounded (uses the global stream)."""
    return tuple(round(random.uniform(a.lo, a.hi), decimals(a)) for a in scenario.attributes)


def utility(scenario: Scenario, weights: Sequence[float], values: Sequence[float]) -> float:
    """Weighted sum of the range-normalised attribute values."""
    return sum(w * (x - a.lo) / (a.hi - a.lo) for w, x, a in zip(weights, values, scenario.attributes))


def target_choice(scenario: Scenario, weights: Sequence[float], a: Sequence[float], b: Sequence[float]) -> str:
    """The target rule: "A" if A's utility is strictly higher, else "B" (ties go to B)."""
    return "A" if utility(scenario, weights, a) > utility(scenario, weights, b) else "B"


def draw_trials(
    scenarios: Sequence[Scenario], weights: Sequence[Sequence[int]], per_scenario: int, seed: int | None
) -> list[list[Trial]]:
    """For each scenario in order, ``per_scenario`` trials (A's five values, then B's).

    ``seed=None`` continues the current stream, which is how extra training trials follow the
    paper's seed-2 draws without changing them.
    """
    if seed is not None:
        random.seed(seed)
    out = []
    for i, (s, w) in enumerate(zip(scenarios, weights)):
        trials = []
        for _ in range(per_scenario):
            a, b = draw_option(s), draw_option(s)
            trials.append(Trial(i, a, b, target_choice(s, w, a, b)))
        out.append(trials)
    return out


def swapped(trial: Trial, label: str) -> Trial:
    """The same pair of options with A and B exchanged, labelled ``label``."""
    return Trial(trial.scenario, trial.b, trial.a, label)


def differing_in(scenario: Scenario, k: int, a: Sequence[float], b: Sequence[float]) -> tuple[float, ...]:
    """``b`` with its attribute ``k`` redrawn (uniform, rounded) until it differs from ``a``'s."""
    b, attr = list(b), scenario.attributes[k]
    while b[k] == a[k]:
        b[k] = round(random.uniform(attr.lo, attr.hi), decimals(attr))
    return tuple(b)


def draw_contrast_trials(
    scenarios: Sequence[Scenario], weights: Sequence[Sequence[int]], per_scenario: int, seed: int = CONTRAST_SEED
) -> list[list[Trial]]:
    """For each scenario, ``per_scenario`` trials whose options differ in one attribute only.

    The attribute cycles through the five; option A is drawn as usual and B copies it with that one
    value redrawn until it differs. Labels follow the target rule, which for such a pair reduces
    to the sign of that attribute's weight: an easier step towards the full five-attribute rule.
    """
    random.seed(seed)
    out = []
    for i, (s, w) in enumerate(zip(scenarios, weights)):
        trials = []
        for j in range(per_scenario):
            k = j % N_ATTRIBUTES
            a = draw_option(s)
            b = differing_in(s, k, a, a)
            trials.append(Trial(i, a, b, target_choice(s, w, a, b)))
        out.append(trials)
    return out


@dataclass(frozen=True)
class AttributeQuestion:
    """A pair of options and a question about one of their attributes, with its answer.

    ``trial.label`` is the option with the higher (``higher=True``) or lower value of attribute
    ``attribute``; the target weights play no part, so these questions teach reading and comparing
    the attributes without telling the model its weights.
    """

    trial: Trial
    attribute: int
    higher: bool

    def question(self, scenario: Scenario) -> str:
        return f"Which option has the {'higher' if self.higher else 'lower'} {scenario.attributes[self.attribute].name}?"


def draw_attribute_questions(
    scenarios: Sequence[Scenario], per_scenario: int, seed: int = ATTRIBUTE_SEED
) -> list[list[AttributeQuestion]]:
    """For each scenario, ``per_scenario`` attribute questions on freshly drawn option pairs.

    The attribute cycles through the five and the direction alternates (higher, then lower, every
    five questions); both options are drawn as usual, B's asked-about value redrawn until it differs.
    """
    random.seed(seed)
    out = []
    for i, s in enumerate(scenarios):
        questions = []
        for j in range(per_scenario):
            k, higher = j % N_ATTRIBUTES, (j // N_ATTRIBUTES) % 2 == 0
            a = draw_option(s)
            b = differing_in(s, k, a, draw_option(s))
            label = "A" if (a[k] > b[k]) == higher else "B"
            questions.append(AttributeQuestion(Trial(i, a, b, label), k, higher))
        out.append(questions)
    return out


def format_value(value: float) -> str:
    """A value as Python prints the rounded float (``67.0``, ``0.25``)."""
    return str(value)


Layout = Literal["blocks", "paired", "scores"]
LAYOUTS: tuple[str, ...] = get_args(Layout)


def score(attr: Attribute, value: float) -> int:
    """A value as a whole number from 0 to 100: its place in the attribute's range, in percent."""
    return round(100 * (value - attr.lo) / (attr.hi - attr.lo))


def trial_text(scenario: Scenario, trial: Trial, question: str | None = None, layout: Layout = "blocks") -> str:
    """The scenario question (or ``question``) followed by both options' attribute values.

    ``blocks`` (the paper's layout): option A's five lines, then option B's. ``paired``: one line
    per attribute holding both options' values ("price: A 10.0 dollars, B 12.0 dollars"), so the
    two numbers to compare sit side by side; the information is the same. ``scores``: the blocks,
    each value written as its :func:`score` without units ("price: 37"), so that every number has
    at most three digits; the rule is the same weighted sum of the scores, up to their rounding.
    """
    head = question or scenario.question
    if layout == "paired":
        return head + "\n" + "\n".join(
            f"{a.name}: A {format_value(va)} {a.units}".rstrip() + f", B {format_value(vb)} {a.units}".rstrip()
            for a, va, vb in zip(scenario.attributes, trial.a, trial.b))
    if layout not in LAYOUTS:
        raise UserError(f"unknown layout {layout!r}; choose one of {', '.join(LAYOUTS)}")

    def lines(values: Sequence[float]) -> str:
        if layout == "scores":
            return "\n".join(f"{a.name}: {score(a, v)}" for a, v in zip(scenario.attributes, values))
        return "\n".join(f"{a.name}: {format_value(v)} {a.units}" for a, v in zip(scenario.attributes, values))

    return f"{head}\nA:\n" + lines(trial.a) + "\n\nB:\n" + lines(trial.b)
