"""The shipped catalog and the validation of user-supplied catalogs."""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any, Callable

import pytest

from selfinterp.catalog import (
    N_ATTRIBUTES,
    Attribute,
    Scenario,
    apply_roles,
    default_catalog_path,
    load_catalog,
    parse_catalog,
)
from selfinterp.errors import UserError
from selfinterp.trials import decimals


def entry(short_name: str = "lamp", n_attributes: int = N_ATTRIBUTES) -> dict[str, Any]:
    """A valid raw catalog entry."""
    return {
        "short_name": short_name,
        "question": f"Which {short_name} would you choose?",
        "attributes": [
            {"name": f"attribute {j}", "units": "units", "range": [0, 10 * (j + 1)]} for j in range(n_attributes)
        ],
    }


def write_catalog(tmp_path: Path, raw: Any) -> Path:
    path = tmp_path / "catalog.json"
    path.write_text(json.dumps(raw), encoding="utf-8")
    return path


# --- the shipped catalog ---------------------------------------------------------------------------------


def test_default_catalog_path_is_the_packaged_resource() -> None:
    path = default_catalog_path()
    assert path.name == "catalog.json"
    assert path.parent.name == "resources"
    assert path.is_file()


def test_shipped_catalog_loads_with_enough_valid_scenarios() -> None:
    scenarios = load_catalog()
    assert len(scenarios) >= 120
    assert scenarios == load_catalog(default_catalog_path())
    names = [s.short_name for s in scenarios]
    assert len(set(names)) == len(names), "short_names must be unique"
    for s in scenarios:
        assert s.short_name.isidentifier() and s.short_name == s.short_name.lower(), s.short_name
        assert s.question.strip() and s.question.endswith("?"), s.short_name
        assert len(s.attributes) == N_ATTRIBUTES
        assert len(set(s.names)) == N_ATTRIBUTES, s.short_name
        for a in s.attributes:
            assert a.name.strip() and a.lo < a.hi, (s.short_name, a)


def test_shipped_catalog_exercises_every_rounding_branch() -> None:
    attrs = [a for s in load_catalog() for a in s.attributes]
    places = [decimals(a) for a in attrs]
    assert places.count(0) > len(attrs) // 2, "most ranges should be wide (integers)"
    assert places.count(1) >= 10
    assert sum(p >= 2 for p in places) >= 3


def test_shipped_ranges_are_exact_at_their_rounding() -> None:
    # Rounded values stay inside the range only if both ends are representable at that precision.
    for s in load_catalog():
        for a in s.attributes:
            d = decimals(a)
            assert round(a.lo, d) == a.lo and round(a.hi, d) == a.hi, (s.short_name, a)


# --- validation -------------------------------------------------------------------------------------------


def test_parse_valid_entry() -> None:
    (s,) = parse_catalog([entry("lamp")])
    assert s == Scenario(
        "lamp",
        "Which lamp would you choose?",
        tuple(Attribute(f"attribute {j}", "units", 0.0, 10.0 * (j + 1)) for j in range(N_ATTRIBUTES)),
    )
    assert s.names == [f"attribute {j}" for j in range(N_ATTRIBUTES)]


def test_empty_units_are_allowed() -> None:
    raw = entry()
    raw["attributes"][2]["units"] = ""
    (s,) = parse_catalog([raw])
    assert s.attributes[2].units == ""


def _four_attributes(raw: dict[str, Any]) -> None:
    raw["attributes"].pop()


def _duplicate_names(raw: dict[str, Any]) -> None:
    raw["attributes"][3]["name"] = raw["attributes"][1]["name"]


def _min_equals_max(raw: dict[str, Any]) -> None:
    raw["attributes"][1]["range"] = [5, 5]


def _min_above_max(raw: dict[str, Any]) -> None:
    raw["attributes"][1]["range"] = [9, 2]


def _text_range(raw: dict[str, Any]) -> None:
    raw["attributes"][0]["range"] = ["0", "10"]


def _bool_range(raw: dict[str, Any]) -> None:
    raw["attributes"][0]["range"] = [False, True]


def _three_numbers(raw: dict[str, Any]) -> None:
    raw["attributes"][0]["range"] = [0, 5, 10]


def _missing_question(raw: dict[str, Any]) -> None:
    del raw["question"]


def _missing_units(raw: dict[str, Any]) -> None:
    del raw["attributes"][4]["units"]


def _non_string_units(raw: dict[str, Any]) -> None:
    raw["attributes"][4]["units"] = None


@pytest.mark.parametrize(
    "break_it, expected",
    [
        (_four_attributes, "exactly 5 attributes, has 4"),
        (_duplicate_names, "unique"),
        (_min_equals_max, "min must be below max"),
        (_min_above_max, "min must be below max"),
        (_text_range, "'range' must be [min, max] numbers"),
        (_bool_range, "'range' must be [min, max] numbers"),
        (_three_numbers, "'range' must be [min, max] numbers"),
        (_missing_question, "missing key 'question'"),
        (_missing_units, "missing key 'units'"),
        (_non_string_units, "'units' must be a string"),
    ],
)
def test_invalid_entry_is_a_user_error_naming_it(break_it: Callable[[dict[str, Any]], None], expected: str) -> None:
    good = [entry("kettle"), entry("toaster")]
    bad = copy.deepcopy(good)
    break_it(bad[1])
    with pytest.raises(UserError) as info:
        parse_catalog(bad, "my.json")
    message = str(info.value)
    assert message.startswith("my.json: scenario 1")
    assert expected in message
    if "short_name" in bad[1]:
        assert "'toaster'" in message


def test_missing_short_name_names_the_index() -> None:
    raw = entry()
    del raw["short_name"]
    with pytest.raises(UserError, match=r"catalog: scenario 0: missing key 'short_name'"):
        parse_catalog([raw])


def test_non_object_entry() -> None:
    with pytest.raises(UserError, match=r"scenario 1: expected an object, got str"):
        parse_catalog([entry(), "toaster"])


@pytest.mark.parametrize("raw", [{"short_name": "x"}, "scenarios", 3, None, []])
def test_top_level_must_be_a_non_empty_list(raw: Any) -> None:
    with pytest.raises(UserError, match=r"^cat\.json: expected a non-empty JSON list"):
        parse_catalog(raw, "cat.json")


def test_load_reports_the_file_for_bad_entries(tmp_path: Path) -> None:
    raw = [entry("a"), entry("b", n_attributes=4)]
    path = write_catalog(tmp_path, raw)
    with pytest.raises(UserError) as info:
        load_catalog(path)
    assert str(path) in str(info.value)
    assert "scenario 1 ('b')" in str(info.value)


def test_load_non_list_file(tmp_path: Path) -> None:
    path = write_catalog(tmp_path, {"scenarios": [entry()]})
    with pytest.raises(UserError, match="expected a non-empty JSON list"):
        load_catalog(path)


def test_load_invalid_json(tmp_path: Path) -> None:
    path = tmp_path / "broken.json"
    path.write_text('[{"short_name": "a",', encoding="utf-8")
    with pytest.raises(UserError, match="not valid") as info:
        load_catalog(path)
    assert str(path) in str(info.value)


def test_load_binary_file(tmp_path: Path) -> None:
    path = tmp_path / "binary.json"
    path.write_bytes(b"\xff\xfe\x00garbage")
    with pytest.raises(UserError, match="not valid") as info:
        load_catalog(str(path))
    assert str(path) in str(info.value)


def test_load_missing_file(tmp_path: Path) -> None:
    path = tmp_path / "nope.json"
    with pytest.raises(UserError, match="does not exist") as info:
        load_catalog(path)
    assert str(path) in str(info.value)


def test_load_accepts_str_and_path(tmp_path: Path) -> None:
    path = write_catalog(tmp_path, [entry("a"), entry("b")])
    assert load_catalog(str(path)) == load_catalog(path)
    assert [s.short_name for s in load_catalog(path)] == ["a", "b"]


# --- roles ------------------------------------------------------------------------------------------------


def test_apply_roles_prefixes_each_question_in_order() -> None:
    scenarios = parse_catalog([entry("kettle"), entry("toaster")])
    roles = ["a night-shift nurse", "a retired teacher, who bakes", "an unused extra role"]
    out = apply_roles(scenarios, roles)
    assert [s.question for s in out] == [
        "Imagine you are a night-shift nurse. Which kettle would you choose?",
        "Imagine you are a retired teacher, who bakes. Which toaster would you choose?",
    ]
    assert [s.attributes for s in out] == [s.attributes for s in scenarios]
    assert [s.short_name for s in out] == ["kettle", "toaster"]
    assert scenarios[0].question == "Which kettle would you choose?", "the input is not modified"


def test_apply_roles_needs_one_role_per_scenario() -> None:
    scenarios = parse_catalog([entry("kettle"), entry("toaster")])
    with pytest.raises(UserError, match="1 roles but 2 scenarios"):
        apply_roles(scenarios, ["a chef"])
