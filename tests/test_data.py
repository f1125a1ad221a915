"""Behaviour of trial generation (trials.py) and of the data set files (dataset.py)."""

from __future__ import annotations

import csv
import json
import math
import random
from decimal import Decimal
from pathlib import Path
from typing import Any, Callable, Sequence

import pytest
from hypothesis import given
from hypothesis import strategies as st

from selfinterp.catalog import Attribute, Scenario, load_catalog
from selfinterp.dataset import (
    SCENARIOS_CSV,
    TEST_CSV,
    TEST_JSONL,
    TRAIN_JSONL,
    VAL_JSONL,
    WEIGHTS_CSV,
    DecisionData,
    Record,
    build_data,
    read_data,
    read_records,
    read_scenarios,
    read_test_trials,
    read_weights,
    write_data,
)
from selfinterp.errors import UserError
from selfinterp.prompts import ATTRIBUTE_PROMPT, DECISION_PROMPT, SYSTEM_PROMPT
from selfinterp.trials import (
    WEIGHTS_SEED,
    Trial,
    decimals,
    draw_attribute_questions,
    draw_contrast_trials,
    draw_option,
    draw_trials,
    draw_weights,
    load_roles,
    swapped,
    target_choice,
    trial_text,
)

N_TRAIN, N_VAL, N_TEST = 12, 3, 8
ALL_FILES = {SCENARIOS_CSV, WEIGHTS_CSV, TRAIN_JSONL, VAL_JSONL, TEST_JSONL, TEST_CSV}

# A small catalog of our own: negative ranges, empty units, every rounding branch, and a question that
# needs CSV quoting.
SMALL_CATALOG = [
    {
        "short_name": "snack",
        "question": 'Which snack would you pick, the "sweet" one or the other?',
        "attributes": [
            {"name": "calories", "units": "kcal", "range": [50, 400]},
            {"name": "price", "units": "dollars", "range": [1.5, 4.5]},
            {"name": "chance of regret", "units": "", "range": [0.0, 0.5]},
            {"name": "salt", "units": "grams", "range": [0.02, 0.07]},
            {"name": "temperature", "units": "°C", "range": [-20, 40]},
        ],
    },
    {
        "short_name": "walk",
        "question": "Which walk would you take?",
        "attributes": [
            {"name": "length", "units": "km", "range": [1, 20]},
            {"name": "climb", "units": "meters", "range": [0, 900]},
            {"name": "mud", "units": "out of 10", "range": [1, 10]},
            {"name": "cafes", "units": "cafes", "range": [0, 6]},
            {"name": "rain", "units": "", "range": [0.1, 0.9]},
        ],
    },
    {
        "short_name": "seat",
        "question": "Which seat would you book?\nThink about comfort.",
        "attributes": [
            {"name": "price", "units": "dollars", "range": [-50, 50]},
            {"name": "legroom", "units": "inches", "range": [28, 40]},
            {"name": "row", "units": "", "range": [1, 40]},
            {"name": "width", "units": "inches", "range": [16.5, 21.0]},
            {"name": "noise", "units": "decibels", "range": [60, 85]},
        ],
    },
]


def small(**kwargs: Any) -> dict[str, Any]:
    """build_data keyword arguments for a small, fast data set."""
    return {"n_train": N_TRAIN, "n_val": N_VAL, "n_test": N_TEST, **kwargs}


@pytest.fixture(scope="module")
def data() -> DecisionData:
    return build_data(n_scenarios=5, **small(extra_train=3))


@pytest.fixture
def small_catalog(tmp_path: Path) -> Path:
    path = tmp_path / "small_catalog.json"
    path.write_text(json.dumps(SMALL_CATALOG), encoding="utf-8")
    return path


# --- helpers that recompute things independently of the package -----------------------------------------


def expected_decimals(width: float) -> int:
    """Places for a range width: 0 from 5 up, 1 from 1 up, else one more than the leading zeros."""
    if width >= 5:
        return 0
    if width >= 1:
        return 1
    k = 1
    while width < 10.0**-k:
        k += 1
    return k + 1


def places(value: float) -> int:
    """Decimal places Python shows for a float (``67.0`` has 0, ``0.25`` has 2)."""
    exponent = Decimal(repr(value)).normalize().as_tuple().exponent
    assert isinstance(exponent, int)
    return max(0, -exponent)


def my_utility(scenario: Scenario, weights: Sequence[float], values: Sequence[float]) -> float:
    return sum(w * (x - a.lo) / (a.hi - a.lo) for w, x, a in zip(weights, values, scenario.attributes))


def parse_options(scenario: Scenario, record: Record) -> tuple[list[float], list[float]]:
    """Read the two options' values back from a record's user text (checks the layout on the way)."""
    assert record.user.startswith(DECISION_PROMPT + scenario.question + "\nA:\n"), record.user
    body = record.user[len(DECISION_PROMPT + scenario.question + "\nA:\n"):]
    block_a, block_b = body.split("\n\nB:\n")
    options = []
    for block in (block_a, block_b):
        lines = block.split("\n")
        assert len(lines) == len(scenario.attributes)
        values = []
        for line, attr in zip(lines, scenario.attributes):
            prefix = f"{attr.name}: "
            assert line.startswith(prefix) and line.endswith(f" {attr.units}"), line
            values.append(float(line[len(prefix):len(line) - len(attr.units) - 1]))
        options.append(values)
    return options[0], options[1]


def scenario_of(data: DecisionData, record: Record) -> Scenario:
    """The scenario whose question a record asks (questions in the test catalogs are distinct)."""
    (match,) = [s for s in data.scenarios if record.user.startswith(DECISION_PROMPT + s.question + "\nA:\n")]
    return match


def check_labels(data: DecisionData, records: Sequence[Record]) -> int:
    """Assert every record's answer follows the utility rule; return how many were checked."""
    checked = 0
    for record in records:
        s = scenario_of(data, record)
        w = data.weights[data.scenarios.index(s)]
        a, b = parse_options(s, record)
        ua, ub = my_utility(s, w, a), my_utility(s, w, b)
        if abs(ua - ub) < 1e-9:  # a float-level near tie: either answer is defensible
            continue
        assert record.answer == ("A" if ua > ub else "B"), (record.user, ua, ub)
        checked += 1
    return checked


# --- decimals and rounding ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "width, expected",
    [(100, 0), (5, 0), (4.9, 1), (1, 1), (0.99, 2), (0.5, 2), (0.25, 2), (0.1, 2), (0.09, 3), (0.05, 3),
     (0.001, 4)],
)
def test_decimals_examples(width: float, expected: int) -> None:
    assert decimals(Attribute("x", "", 0.0, width)) == expected


@given(mantissa=st.integers(1, 99_999), exponent=st.integers(0, 7))
def test_decimals_property(mantissa: int, exponent: int) -> None:
    width = mantissa / 10**exponent
    assert decimals(Attribute("x", "u", 0.0, width)) == expected_decimals(width)


attribute_bounds = st.tuples(
    st.floats(-1e6, 1e6, allow_nan=False, allow_infinity=False),
    st.floats(1e-4, 1e6, allow_nan=False, allow_infinity=False),
)


@given(bounds=st.lists(attribute_bounds, min_size=5, max_size=5), seed=st.integers(0, 2**32 - 1))
def test_drawn_values_are_rounded_and_in_range(bounds: list[tuple[float, float]], seed: int) -> None:
    attrs = tuple(Attribute(f"a{j}", "u", lo, lo + width) for j, (lo, width) in enumerate(bounds))
    scenario = Scenario("s", "Which?", attrs)
    random.seed(seed)
    for _ in range(5):
        values = draw_option(scenario)
        assert len(values) == 5
        for v, a in zip(values, attrs):
            d = decimals(a)
            assert isinstance(v, float)
            assert places(v) <= d
            # Rounding is monotone, so a value lies between the rounded ends of its range.
            assert round(a.lo, d) <= v <= round(a.hi, d)
            if round(a.lo, d) == a.lo and round(a.hi, d) == a.hi:
                assert a.lo <= v <= a.hi


@given(lo=st.integers(-1000, 1000), seed=st.integers(0, 10**6))
def test_narrow_ranges_round_to_their_decimals(lo: int, seed: int) -> None:
    attrs = (
        Attribute("a", "", lo, lo + 0.25),  # 2 decimals
        Attribute("b", "", lo, lo + 0.05),  # 3 decimals
        Attribute("c", "", lo, lo + 2.0),  # 1 decimal
        Attribute("d", "", lo, lo + 7),  # integers
        Attribute("e", "", 0.0, 0.5),  # 2 decimals
    )
    random.seed(seed)
    values = draw_option(Scenario("s", "Which?", attrs))
    assert [places(v) <= d for v, d in zip(values, (2, 3, 1, 0, 2))] == [True] * 5
    assert all(a.lo <= v <= a.hi for v, a in zip(values, attrs))


def test_shipped_catalog_values_stay_in_range(data: DecisionData) -> None:
    for t in data.test_trials:
        s = data.scenarios[t.scenario]
        for option in (t.a, t.b):
            for v, a in zip(option, s.attributes):
                assert a.lo <= v <= a.hi and places(v) <= decimals(a)


# --- weights -------------------------------------------------------------------------------------------------


@given(n=st.integers(1, 40), seed=st.integers(0, 2**32 - 1))
def test_weights_are_scaled_integers(n: int, seed: int) -> None:
    weights = draw_weights(n, seed)
    assert weights == draw_weights(n, seed), "deterministic for a seed"
    assert len(weights) == n
    random.seed(seed)
    for row in weights:
        raw = [random.uniform(-100, 100) for _ in range(5)]
        assert len(row) == 5
        assert all(type(w) is int for w in row)
        assert max(abs(w) for w in row) == 100
        assert all(-100 <= w <= 100 for w in row)
        top = max(abs(r) for r in raw)
        for w, r in zip(row, raw):
            assert abs(w - 100 * r / top) <= 0.5 + 1e-9  # the raw draw, scaled, then rounded
            assert w == 0 or (w > 0) == (r > 0), "signs are kept"


def test_weights_default_seed_and_prefix() -> None:
    assert draw_weights(4) == draw_weights(4, WEIGHTS_SEED)
    assert draw_weights(7)[:4] == draw_weights(4)
    assert draw_weights(4, 1) != draw_weights(4, 2)


def test_build_data_uses_the_seeded_weights(data: DecisionData) -> None:
    assert data.weights == draw_weights(len(data.scenarios))


# --- labels ------------------------------------------------------------------------------------------------------


def test_every_label_follows_the_utility_rule(data: DecisionData) -> None:
    for records in (data.train, data.val, data.test):
        assert check_labels(data, records) >= len(records) - 2
    for t, record in zip(data.test_trials, data.test):
        s, w = data.scenarios[t.scenario], data.weights[t.scenario]
        ua, ub = my_utility(s, w, t.a), my_utility(s, w, t.b)
        if abs(ua - ub) >= 1e-9:
            assert t.label == ("A" if ua > ub else "B")
        assert record.answer == t.label
        assert parse_options(s, record) == (list(t.a), list(t.b))


def test_labels_use_both_answers(data: DecisionData) -> None:
    answers = [r.answer for r in data.train]
    assert set(answers) == {"A", "B"}
    assert 0.2 < answers.count("A") / len(answers) < 0.8


def test_small_catalog_labels(small_catalog: Path) -> None:
    d = build_data(n_scenarios=3, catalog=str(small_catalog), **small())
    assert check_labels(d, d.train + d.val + d.test) >= len(d.train + d.val + d.test) - 2


def test_ties_go_to_b() -> None:
    attrs = tuple(Attribute(f"a{j}", "", 0.0, 10.0) for j in range(5))
    s = Scenario("tie", "Which?", attrs)
    w = [100, -100, 0, 0, 0]
    same = (5.0, 5.0, 1.0, 2.0, 3.0)
    assert target_choice(s, w, same, same) == "B"
    a, b = (5.0, 5.0, 9.0, 9.0, 9.0), (7.0, 7.0, 0.0, 0.0, 0.0)  # equal utility (0), different options
    assert my_utility(s, w, a) == my_utility(s, w, b) == 0
    assert target_choice(s, w, a, b) == "B"
    assert target_choice(s, w, b, a) == "B"
    better = (6.0, 5.0, 0.0, 0.0, 0.0)
    assert target_choice(s, w, better, a) == "A"
    assert target_choice(s, w, a, better) == "B"


def test_draw_trials_labels_and_seed() -> None:
    scenarios = load_catalog()[:3]
    weights = draw_weights(3)
    trials = draw_trials(scenarios, weights, 4, seed=11)
    assert trials == draw_trials(scenarios, weights, 4, seed=11)
    assert [[t.scenario for t in ts] for ts in trials] == [[0] * 4, [1] * 4, [2] * 4]
    for ts in trials:
        for t in ts:
            s = scenarios[t.scenario]
            assert t.label == target_choice(s, weights[t.scenario], t.a, t.b)
    # seed=None continues the current stream
    random.seed(11)
    draw_trials(scenarios, weights, 4, seed=None)
    assert draw_trials(scenarios, weights, 2, seed=None) != draw_trials(scenarios, weights, 2, seed=11)


# --- determinism, disjointness and prefix stability -----------------------------------------------------------------


def test_write_is_byte_for_byte_deterministic(tmp_path: Path) -> None:
    outs = []
    for name in ("one", "two"):
        paths = write_data(build_data(n_scenarios=4, **small(extra_train=2)), tmp_path / name)
        assert {p.name for p in paths} == ALL_FILES
        assert {p.name for p in (tmp_path / name).iterdir()} == ALL_FILES, "no temporary files left behind"
        outs.append(tmp_path / name)
    for name in ALL_FILES:
        assert (outs[0] / name).read_bytes() == (outs[1] / name).read_bytes(), name


def test_test_set_is_disjoint_from_training(data: DecisionData) -> None:
    seen = {r.user for r in data.train + data.val}
    assert not [r for r in data.test if r.user in seen]
    assert not {r.user for r in data.val} & {r.user for r in data.train}
    assert len({r.user for r in data.test}) == len(data.test)


def test_sizes_and_order(data: DecisionData) -> None:
    n = len(data.scenarios)
    assert n == 5
    per_train = N_TRAIN + 3
    assert len(data.train) == n * per_train and len(data.val) == n * N_VAL and len(data.test) == n * N_TEST
    assert [t.scenario for t in data.test_trials] == [i for i in range(n) for _ in range(N_TEST)]
    for i, s in enumerate(data.scenarios):
        for r in data.train[i * per_train:(i + 1) * per_train] + data.val[i * N_VAL:(i + 1) * N_VAL]:
            assert scenario_of(data, r) == s
    assert all(r.system == SYSTEM_PROMPT for r in data.train + data.val + data.test)


def test_more_scenarios_keep_the_first_ones() -> None:
    k = 3
    fewer, more = build_data(n_scenarios=k, **small()), build_data(n_scenarios=k + 3, **small())
    assert more.scenarios[:k] == fewer.scenarios
    assert more.weights[:k] == fewer.weights
    assert more.train[:k * N_TRAIN] == fewer.train
    assert more.val[:k * N_VAL] == fewer.val
    assert more.test[:k * N_TEST] == fewer.test
    assert more.test_trials[:k * N_TEST] == fewer.test_trials


def test_scenario_ids_pick_scenarios_with_their_full_experiment_weights_and_trials() -> None:
    more = {"extra_train": 2, "contrast_train": 1, "attribute_train": 1}
    full = build_data(n_scenarios=4, **small(**more))
    picked = build_data(scenario_ids=[3, 1], **small(**more))
    assert picked.scenarios == [full.scenarios[3], full.scenarios[1]]
    assert picked.weights == [full.weights[3], full.weights[1]]
    per = N_TRAIN + 2 + 1 + 1  # training records per scenario: the paper's, extra, contrast, attribute question
    assert picked.train == full.train[3 * per:4 * per] + full.train[per:2 * per]
    assert picked.val == full.val[3 * N_VAL:4 * N_VAL] + full.val[N_VAL:2 * N_VAL]
    assert picked.test == full.test[3 * N_TEST:4 * N_TEST] + full.test[N_TEST:2 * N_TEST]
    # Renumbered 0, 1 in the order given: the values and the labels are the full experiment's.
    assert [t.scenario for t in picked.test_trials] == [0] * N_TEST + [1] * N_TEST
    assert [(t.a, t.b, t.label) for t in picked.test_trials] == [
        (t.a, t.b, t.label) for t in full.test_trials[3 * N_TEST:4 * N_TEST] + full.test_trials[N_TEST:2 * N_TEST]]
    assert all(scenario_of(picked, r) == picked.scenarios[0] for r in picked.train[:N_TRAIN])


def test_given_weights_relabel_the_same_trials() -> None:
    """data.weights replaces the drawn weights of the scenarios used (in scenario_ids order) and only
    the labels change: scenario 3 given scenario 0's weights decides its own trials by them."""
    more = {"extra_train": 2, "contrast_train": 1}
    drawn = build_data(scenario_ids=[0, 3], **small(**more))
    rule = drawn.weights[0]
    given = build_data(scenario_ids=[0, 3], weights=[rule, rule], **small(**more))
    assert given.weights == [rule, rule] and drawn.weights[1] != rule
    assert given.scenarios == drawn.scenarios
    assert [(t.scenario, t.a, t.b) for t in given.test_trials] == [(t.scenario, t.a, t.b) for t in drawn.test_trials]
    tv = given.scenarios[1]
    expected = [target_choice(tv, rule, t.a, t.b) for t in given.test_trials[N_TEST:]]
    assert [t.label for t in given.test_trials[N_TEST:]] == expected
    assert expected != [t.label for t in drawn.test_trials[N_TEST:]]  # the relabelling did something
    assert given.test_trials[:N_TEST] == drawn.test_trials[:N_TEST]  # scenario 0 kept its own weights
    assert given.train[:len(given.train) // 2] == drawn.train[:len(drawn.train) // 2]
    assert [r.answer for r in given.test[N_TEST:]] == expected


@pytest.mark.parametrize("weights", [[[1, 2, 3, 4, 5]], [[1, 2, 3, 4]] * 2, [[0, 0, 0, 0, 0], [1, 2, 3, 4, 5]],
                                     [[101, 0, 0, 0, 0]] * 2, [[1.5, 0, 0, 0, 0]] * 2, "1,2,3,4,5"])
def test_given_weights_are_checked(weights: Any) -> None:
    with pytest.raises(UserError, match=r"data.weights: .*one row of 5 integers between -100 and 100, not all 0, "
                                        r"for each of the 2 scenario\(s\) used"):
        build_data(n_scenarios=2, weights=weights, **small())


@pytest.mark.parametrize("ids", [[], [1, 1], [-1], [10_000]])
def test_scenario_ids_are_checked(ids: list[int]) -> None:
    with pytest.raises(UserError, match="distinct indices between 0 and"):
        build_data(scenario_ids=ids)


def test_extra_training_records_follow_the_papers(data: DecisionData) -> None:
    base = build_data(n_scenarios=5, **small())
    per = N_TRAIN + 3
    for i in range(5):
        block = data.train[i * per:(i + 1) * per]
        assert block[:N_TRAIN] == base.train[i * N_TRAIN:(i + 1) * N_TRAIN]
        assert all(scenario_of(data, r) == data.scenarios[i] for r in block[N_TRAIN:])
    assert data.val == base.val and data.test == base.test and data.weights == base.weights
    assert not {r.user for r in data.train[N_TRAIN:per]} & {r.user for r in base.train}


def test_contrast_trials_differ_in_one_attribute_labelled_by_that_weights_sign(data: DecisionData) -> None:
    per = 12
    trials = draw_contrast_trials(data.scenarios, data.weights, per)
    assert [len(ts) for ts in trials] == [per] * len(data.scenarios)
    for i, ts in enumerate(trials):
        scenario, weights = data.scenarios[i], data.weights[i]
        for j, t in enumerate(ts):
            changed = [k for k in range(5) if t.a[k] != t.b[k]]
            assert changed == [j % 5]  # one attribute, cycling through the five
            (k,) = changed
            attr = scenario.attributes[k]
            assert attr.lo <= t.b[k] <= attr.hi and round(t.b[k], decimals(attr)) == t.b[k]
            assert t.label == target_choice(scenario, weights, t.a, t.b)
            if weights[k]:  # the rule reduces to: more of a positively weighted attribute wins
                assert t.label == ("A" if (t.a[k] > t.b[k]) == (weights[k] > 0) else "B")
    assert draw_contrast_trials(data.scenarios, data.weights, per) == trials  # seeded


def test_contrast_training_records_come_after_each_scenarios_others(data: DecisionData) -> None:
    more = build_data(n_scenarios=5, **small(extra_train=3, contrast_train=4))
    per, easy = N_TRAIN + 3, 4
    contrast = draw_contrast_trials(data.scenarios, data.weights, easy)
    for i in range(5):
        block = more.train[i * (per + easy):(i + 1) * (per + easy)]
        assert block[:per] == data.train[i * per:(i + 1) * per]
        assert [r.answer for r in block[per:]] == [t.label for t in contrast[i]]
    assert more.val == data.val and more.test == data.test


def test_attribute_questions_are_answered_by_the_asked_values(data: DecisionData) -> None:
    per = 20
    questions = draw_attribute_questions(data.scenarios, per)
    assert [len(qs) for qs in questions] == [per] * len(data.scenarios)
    for i, qs in enumerate(questions):
        assert [(q.attribute, q.higher) for q in qs[:10]] == [(k, True) for k in range(5)] + [(k, False) for k in range(5)]
        for q in qs:
            a, b, k = q.trial.a, q.trial.b, q.attribute
            assert q.trial.scenario == i and a[k] != b[k]
            bigger = "A" if a[k] > b[k] else "B"
            assert q.trial.label == (bigger if q.higher else {"A": "B", "B": "A"}[bigger])
    assert {q.trial.label for qs in questions for q in qs} == {"A", "B"}
    assert draw_attribute_questions(data.scenarios, per) == questions  # seeded


def test_attribute_question_records(data: DecisionData) -> None:
    more = build_data(n_scenarios=5, **small(extra_train=3, attribute_train=4))
    per, asked = N_TRAIN + 3, 4
    questions = draw_attribute_questions(data.scenarios, asked)
    for i in range(5):
        block = more.train[i * (per + asked):(i + 1) * (per + asked)]
        assert block[:per] == data.train[i * per:(i + 1) * per] and all(r.stage == 1 for r in block[:per])
        for r, q in zip(block[per:], questions[i]):
            assert r.stage == 0 and r.answer == q.trial.label
            assert r.user == ATTRIBUTE_PROMPT + trial_text(data.scenarios[i], q.trial, q.question(data.scenarios[i]))
    laptop, longer = load_catalog()[0], draw_attribute_questions(data.scenarios[:1], 6)[0]
    assert longer[0].question(laptop) == "Which option has the higher battery life?"
    assert longer[5].question(laptop) == "Which option has the lower battery life?"
    assert more.train[per].user.split("\n")[2] == "Which option has the higher battery life?"
    assert more.val == data.val and more.test == data.test


def test_mirror_train_follows_each_training_record_with_its_options_exchanged(data: DecisionData) -> None:
    mirrored = build_data(n_scenarios=5, **small(extra_train=3, attribute_train=2, mirror_train=True))
    plain = build_data(n_scenarios=5, **small(extra_train=3, attribute_train=2))
    assert mirrored.train[0::2] == plain.train and len(mirrored.train) == 2 * len(plain.train)
    assert mirrored.val == plain.val and mirrored.test == plain.test
    per = N_TRAIN + 3
    first = draw_trials(data.scenarios, data.weights, N_TRAIN + 10, 2)[0][0]  # scenario 0's first paper trial
    assert mirrored.train[1].user == DECISION_PROMPT + trial_text(data.scenarios[0], swapped(first, first.label))
    for original, mirror in zip(mirrored.train[0::2], mirrored.train[1::2]):
        a_block, b_block = original.user.split("\nA:\n")[1].split("\n\nB:\n")
        assert mirror.user.endswith("\nA:\n" + b_block + "\n\nB:\n" + a_block) and mirror.stage == original.stage
    answers = [(o.answer, m.answer) for o, m in zip(mirrored.train[0::2], mirrored.train[1::2])]
    assert set(answers) == {("A", "B"), ("B", "A")}  # no ties in these draws: the rule flips with the options
    questions = mirrored.train[2 * per:2 * per + 4]  # scenario 0's attribute questions, each then its mirror
    assert [r.stage for r in questions] == [0] * 4 and questions[0].answer != questions[1].answer

def test_build_data_rejects_bad_sizes() -> None:
    with pytest.raises(UserError, match="only"):
        build_data(n_scenarios=10_000)
    for bad in ({"n_train": 0}, {"n_test": 0}, {"n_scenarios": 0}):
        with pytest.raises(UserError, match="at least 1"):
            build_data(**{"n_scenarios": 2, **bad})
    for bad in ("extra_train", "contrast_train", "attribute_train"):
        with pytest.raises(UserError, match="negative"):
            build_data(n_scenarios=2, **{bad: -1})


# --- text format ---------------------------------------------------------------------------------------------------------


def test_trial_text_exact_format() -> None:
    s = Scenario(
        "tiny",
        "Which snack would you pick?",
        (
            Attribute("calories", "kcal", 50, 400),
            Attribute("price", "dollars", 1.5, 4.5),
            Attribute("regret", "", 0.0, 0.5),
            Attribute("salt", "grams", 0.02, 0.07),
            Attribute("temperature", "°C", -20, 40),
        ),
    )
    t = Trial(0, (67.0, 2.5, 0.25, 0.031, -3.0), (400.0, 1.5, 0.0, 0.07, 12.0), "A")
    assert trial_text(s, t) == (
        "Which snack would you pick?\n"
        "A:\n"
        "calories: 67.0 kcal\n"
        "price: 2.5 dollars\n"
        "regret: 0.25 \n"
        "salt: 0.031 grams\n"
        "temperature: -3.0 °C\n"
        "\n"
        "B:\n"
        "calories: 400.0 kcal\n"
        "price: 1.5 dollars\n"
        "regret: 0.0 \n"
        "salt: 0.07 grams\n"
        "temperature: 12.0 °C"
    )
    assert trial_text(s, t, layout="paired") == (
        "Which snack would you pick?\n"
        "calories: A 67.0 kcal, B 400.0 kcal\n"
        "price: A 2.5 dollars, B 1.5 dollars\n"
        "regret: A 0.25, B 0.0\n"
        "salt: A 0.031 grams, B 0.07 grams\n"
        "temperature: A -3.0 °C, B 12.0 °C"
    )
    assert trial_text(s, t, layout="scores") == (  # percent of each range, rounded; the rule is unchanged
        "Which snack would you pick?\n"
        "A:\n"
        "calories: 5\n"
        "price: 33\n"
        "regret: 50\n"
        "salt: 22\n"
        "temperature: 28\n"
        "\n"
        "B:\n"
        "calories: 100\n"
        "price: 0\n"
        "regret: 0\n"
        "salt: 100\n"
        "temperature: 53"
    )
    with pytest.raises(UserError, match="unknown layout 'rows'"):
        trial_text(s, t, layout="rows")


def test_paired_layout_changes_only_the_trial_text(small_catalog: Path) -> None:
    blocks = build_data(n_scenarios=2, catalog=str(small_catalog), **small(attribute_train=1))
    paired = build_data(n_scenarios=2, catalog=str(small_catalog), layout="paired", **small(attribute_train=1))
    assert (blocks.layout, paired.layout) == ("blocks", "paired")
    assert paired.test_trials == blocks.test_trials and paired.weights == blocks.weights
    assert [r.answer for r in paired.train] == [r.answer for r in blocks.train]
    t = paired.test_trials[0]
    assert paired.test[0].user == DECISION_PROMPT + trial_text(paired.scenarios[0], t, layout="paired")
    everything = [(x, y) for split in ("train", "val", "test") for x, y in zip(getattr(blocks, split), getattr(paired, split))]
    assert {x.stage for x, _ in everything} == {0, 1}  # attribute questions are laid out the same way
    assert all("\nA:\n" in x.user and "\nA:\n" not in y.user and x.user[:60] == y.user[:60] for x, y in everything)
    with pytest.raises(UserError, match="unknown layout 'rows'; choose one of blocks, paired, scores"):
        build_data(n_scenarios=1, layout="rows")


def test_record_messages(data: DecisionData) -> None:
    t, r = data.test_trials[0], data.test[0]
    assert r.user == DECISION_PROMPT + trial_text(data.scenarios[0], t)
    assert r.messages() == [
        {"role": "system", "content": SYSTEM_PROMPT},
        {"role": "user", "content": r.user},
        {"role": "assistant", "content": t.label},
    ]
    assert r.messages(with_answer=False) == r.messages()[:2]


def test_custom_prompts(small_catalog: Path) -> None:
    d = build_data(n_scenarios=2, catalog=str(small_catalog), system_prompt="", decision_prompt="Choose:\n",
                   **small())
    assert all(r.system == "" and r.user.startswith("Choose:\n") for r in d.train + d.test)
    assert d.test[0].messages()[0]["role"] == "user"


# --- files ---------------------------------------------------------------------------------------------------------------


def test_round_trip(tmp_path: Path, small_catalog: Path) -> None:
    d = build_data(n_scenarios=3, catalog=str(small_catalog), **small(extra_train=1))
    write_data(d, tmp_path / "data")
    back = read_data(tmp_path / "data")
    assert back.train == d.train and back.val == d.val and back.test == d.test
    assert back.weights == d.weights
    assert back.test_trials == d.test_trials
    assert [s.question for s in back.scenarios] == [s.question for s in d.scenarios]
    assert [s.attributes for s in back.scenarios] == [s.attributes for s in d.scenarios]  # names, units, ranges
    assert [s.short_name for s in back.scenarios] == ["scenario_0", "scenario_1", "scenario_2"]


def test_round_trip_recognises_the_layout(tmp_path: Path, small_catalog: Path) -> None:
    for layout in ("blocks", "paired", "scores"):
        d = build_data(n_scenarios=2, catalog=str(small_catalog), layout=layout, **small())
        write_data(d, tmp_path / layout)
        back = read_data(tmp_path / layout)
        assert back.layout == layout and back.test == d.test


def test_round_trip_keeps_curriculum_stages(tmp_path: Path, small_catalog: Path) -> None:
    d = build_data(n_scenarios=2, catalog=str(small_catalog), **small(attribute_train=3))
    write_data(d, tmp_path)
    lines = [json.loads(line) for line in (tmp_path / TRAIN_JSONL).read_text().splitlines()]
    assert [line.get("stage") for line in lines] == ([None] * N_TRAIN + [0] * 3) * 2
    assert read_records(tmp_path / TRAIN_JSONL) == d.train


def test_round_trip_without_system_prompt(tmp_path: Path, small_catalog: Path) -> None:
    d = build_data(n_scenarios=2, catalog=str(small_catalog), system_prompt="", **small())
    write_data(d, tmp_path)
    assert read_records(tmp_path / TRAIN_JSONL) == d.train
    assert read_data(tmp_path).test == d.test


def test_file_layout(tmp_path: Path, small_catalog: Path) -> None:
    d = build_data(n_scenarios=3, catalog=str(small_catalog), **small())
    write_data(d, tmp_path)
    with (tmp_path / WEIGHTS_CSV).open(newline="") as f:
        rows = list(csv.reader(f))
    assert rows[0] == ["scenario", "attr1", "attr2", "attr3", "attr4", "attr5"]
    assert rows[1:] == [[str(i), *map(str, w)] for i, w in enumerate(d.weights)]
    with (tmp_path / SCENARIOS_CSV).open(newline="") as f:
        scen = list(csv.DictReader(f))
    assert scen[0]["question"] == SMALL_CATALOG[0]["question"]
    assert scen[0]["attr3_units"] == "" and scen[0]["attr1_min"] == "50.0" and scen[2]["attr1_min"] == "-50.0"
    first = json.loads((tmp_path / TRAIN_JSONL).read_text().splitlines()[0])
    assert [m["role"] for m in first["messages"]] == ["system", "user", "assistant"]
    assert len((tmp_path / TEST_JSONL).read_text().splitlines()) == 3 * N_TEST
    with (tmp_path / TEST_CSV).open(newline="") as f:
        trials = list(csv.DictReader(f))
    assert [r["trial"] for r in trials] == [str(j) for j in range(3 * N_TEST)]
    assert {r["target"] for r in trials} <= {"A", "B"}


@pytest.fixture
def folder(tmp_path: Path, small_catalog: Path) -> Path:
    out = tmp_path / "data"
    write_data(build_data(n_scenarios=2, catalog=str(small_catalog), **small()), out)
    return out


@pytest.mark.parametrize("name", sorted(ALL_FILES - {VAL_JSONL}))
def test_missing_file_is_named(folder: Path, name: str) -> None:
    (folder / name).unlink()
    with pytest.raises(UserError, match="does not exist") as info:
        read_data(folder)
    assert str(folder / name) in str(info.value)


def test_validation_file_is_optional(folder: Path) -> None:
    (folder / VAL_JSONL).unlink()
    assert read_data(folder).val == []


def test_missing_folder(tmp_path: Path) -> None:
    with pytest.raises(UserError, match="does not exist") as info:
        read_data(tmp_path / "nowhere")
    assert str(tmp_path / "nowhere") in str(info.value)


def _drop_column(path: Path, column: str) -> None:
    with path.open(newline="", encoding="utf-8") as f:
        rows = list(csv.DictReader(f))
    fields = [c for c in rows[0] if c != column]
    with path.open("w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, fields, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)


@pytest.mark.parametrize(
    "name, column, reader",
    [(WEIGHTS_CSV, "attr3", read_weights), (SCENARIOS_CSV, "attr2_max", read_scenarios),
     (TEST_CSV, "B_attribute_5", read_test_trials), (TEST_CSV, "target", read_test_trials)],
)
def test_missing_column_is_named(folder: Path, name: str, column: str, reader: Callable[[Path], Any]) -> None:
    _drop_column(folder / name, column)
    for read in (reader, lambda p: read_data(p.parent)):
        with pytest.raises(UserError) as info:
            read(folder / name)
        assert str(folder / name) in str(info.value) and column in str(info.value)


def test_empty_csv(folder: Path) -> None:
    (folder / WEIGHTS_CSV).write_text("")
    with pytest.raises(UserError, match="missing column") as info:
        read_weights(folder / WEIGHTS_CSV)
    assert str(folder / WEIGHTS_CSV) in str(info.value)


def test_non_number_in_csv(folder: Path) -> None:
    path = folder / WEIGHTS_CSV
    path.write_text(path.read_text().replace("\n1,", "\n1,lots,", 1))
    with pytest.raises(UserError, match="'lots' is not a number") as info:
        read_weights(path)
    assert f"{path}, row 3" in str(info.value)


def test_bad_target(folder: Path) -> None:
    path = folder / TEST_CSV
    lines = path.read_text().splitlines()
    lines[2] = lines[2][:-1] + "C"
    path.write_text("\n".join(lines) + "\n")
    with pytest.raises(UserError, match="target must be A or B") as info:
        read_test_trials(path)
    assert f"{path}, row 3" in str(info.value)


def _append_line(path: Path, line: str) -> int:
    """Append a line to a JSONL file and return its line number."""
    n = len(path.read_text().splitlines())
    with path.open("a", encoding="utf-8") as f:
        f.write(line + "\n")
    return n + 1


@pytest.mark.parametrize(
    "line, expected",
    [
        ("this is not json", "expected a JSON object"),
        ('{"messages": [', "expected a JSON object"),
        ('{"chat": []}', "expected a JSON object"),
        ("[1, 2, 3]", "expected a JSON object"),
        ('{"messages": 7}', "expected a JSON object"),
        ('{"messages": [{"role": "user", "content": "x"}, {"role": "system", "content": "y"}, '
         '{"role": "assistant", "content": "A"}]}', "got roles ['user', 'system', 'assistant']"),
        ('{"messages": [{"role": "user", "content": "x"}]}', "got roles ['user']"),
        ('{"messages": ["user", "assistant"]}', "got roles [None, None]"),
        ('{"messages": [{"role": "user", "content": "x"}, {"role": "assistant", "content": 1}]}', "string 'content'"),
        ('{"messages": [{"role": "user", "content": "x"}, {"role": "assistant", "content": "A"}], "stage": 2}',
         '"stage" must be 0'),
    ],
)
def test_malformed_jsonl_line_is_named(folder: Path, line: str, expected: str) -> None:
    for name in (TRAIN_JSONL, TEST_JSONL):
        path = folder / name
        original = path.read_text()
        n = _append_line(path, line)
        with pytest.raises(UserError) as info:
            read_data(folder)
        assert f"{path}, line {n}" in str(info.value)
        assert expected in str(info.value)
        path.write_text(original)


def test_blank_jsonl_lines_are_skipped(folder: Path) -> None:
    path = folder / TRAIN_JSONL
    records = read_records(path)
    path.write_text("\n" + path.read_text() + "\n\n")
    assert read_records(path) == records


def test_inconsistent_folder(folder: Path) -> None:
    lines = (folder / TEST_JSONL).read_text().splitlines()
    (folder / TEST_JSONL).write_text("\n".join(lines[:-1]) + "\n")
    with pytest.raises(UserError, match=f"{TEST_JSONL} has {len(lines) - 1} records"):
        read_data(folder)


def test_weight_rows_must_match_scenarios(folder: Path) -> None:
    path = folder / WEIGHTS_CSV
    path.write_text("\n".join(path.read_text().splitlines()[:-1]) + "\n")
    with pytest.raises(UserError, match="2 scenarios but 1 weight rows"):
        read_data(folder)


# --- roles -----------------------------------------------------------------------------------------------------------------

ROLES = ["a night-shift nurse", "a farmer, who keeps bees", 'a "frugal" student', "a retired pilot", "a chef",
         "a marathon runner", "a new parent"]


@pytest.fixture
def roles_csv(tmp_path: Path) -> Path:
    path = tmp_path / "roles.csv"
    with path.open("w", newline="", encoding="utf-8") as f:
        csv.writer(f).writerows([[r] for r in ROLES])  # no header: every row is a role
    assert '"a farmer, who keeps bees"' in path.read_text()
    return path


def test_roles_are_read_and_shuffled_with_seed_0(roles_csv: Path) -> None:
    expected = list(ROLES)
    random.seed(0)
    random.shuffle(expected)
    assert load_roles(roles_csv) == expected
    assert expected != ROLES


def test_roles_prefix_the_questions(roles_csv: Path) -> None:
    shuffled = list(ROLES)
    random.seed(0)
    random.shuffle(shuffled)
    plain = build_data(n_scenarios=4, **small())
    d = build_data(n_scenarios=4, roles=str(roles_csv), **small())
    assert [s.question for s in d.scenarios] == [
        f"Imagine you are {shuffled[i]}. {s.question}" for i, s in enumerate(plain.scenarios)
    ]
    assert d.weights == plain.weights
    assert d.test_trials == plain.test_trials, "roles change the wording, not the draws"
    for i, (r, p) in enumerate(zip(d.train, plain.train)):
        s = i // N_TRAIN
        assert r.user == p.user.replace(plain.scenarios[s].question, d.scenarios[s].question, 1)
        assert r.answer == p.answer


def test_roles_errors(tmp_path: Path, roles_csv: Path) -> None:
    with pytest.raises(UserError, match="does not exist") as info:
        load_roles(tmp_path / "none.csv")
    assert "none.csv" in str(info.value)
    empty = tmp_path / "empty.csv"
    empty.write_text("")
    with pytest.raises(UserError, match="no rows"):
        load_roles(empty)
    with pytest.raises(UserError, match="7 roles but 9 scenarios"):
        build_data(n_scenarios=9, roles=str(roles_csv), **small())


def test_decimals_agree_with_log_formula_on_shipped_catalog() -> None:
    for s in load_catalog():
        for a in s.attributes:
            w = a.hi - a.lo
            p = 0 if w >= 5 else 1 if w >= 1 else abs(math.floor(math.log10(w))) + 1
            assert decimals(a) == p == expected_decimals(w)
