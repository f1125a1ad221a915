"""The tea positive control (scripts/tea_control.py) writes a data folder the project trains on."""

from __future__ import annotations

import re

import pytest

from selfinterp.dataset import read_data
from test_bench import load_script


def test_tea_questions_are_labelled_by_the_larger_value_and_read_back(tmp_path):
    tea = load_script("tea_control")
    tea.main(["--out", str(tmp_path), "--n", "40", "--seed", "1"])
    data = read_data(tmp_path)
    assert len(data.train) == 40 and all(r.stage == 0 for r in data.train)
    for r in data.train:
        a, b = map(int, re.findall(r"caffeine: (\d+) mg", r.user))
        assert a != b and 0 <= min(a, b) and max(a, b) <= 70
        assert r.answer == ("A" if a > b else "B")
    assert {r.answer for r in data.train} == {"A", "B"}
    assert len(data.test) == 50 and len(data.val) == 8  # scenario 0's usual decisions, verified as always
    assert tea.tea_records(40, 1) == data.train and tea.tea_records(40, 2) != data.train


def test_distractor_lines_follow_caffeine_and_leave_the_answers_alone():
    tea = load_script("tea_control")
    plain, padded = tea.tea_records(30, 3), tea.tea_records(30, 3, attributes=5)
    assert [r.answer for r in plain] == [r.answer for r in padded]
    for r in padded:
        options = r.user.split("\nA:\n")[1].split("\n\nB:\n")
        assert [[line.split(":")[0] for line in o.split("\n")] for o in options] == [
            ["caffeine", "price", "steeping time", "leaf grade", "package weight"]] * 2
    with pytest.raises(SystemExit, match="1 to 5"):
        tea.main(["--out", "x", "--attributes", "6"])
