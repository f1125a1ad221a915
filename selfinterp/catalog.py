"""Decision scenarios: the catalog schema, its validation, and the project's own catalog.

A catalog is a JSON list of ``{"short_name", "question", "attributes": [5 x {"name", "units",
"range": [min, max]}]}``; the paper's ``candidate_scenarios.json`` has the same schema.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, replace
from importlib import resources
from pathlib import Path
from typing import Any, Sequence

from selfinterp.errors import UserError

N_ATTRIBUTES = 5


@dataclass(frozen=True)
class Attribute:
    """One quantitative attribute of a scenario's options."""

    name: str
    units: str
    lo: float
    hi: float


@dataclass(frozen=True)
class Scenario:
    """A decision between two options described by the same five attributes."""

    short_name: str
    question: str
    attributes: tuple[Attribute, ...]

    @property
    def names(self) -> list[str]:
        return [a.name for a in self.attributes]


def default_catalog_path() -> Path:
    """The catalog shipped inside the package."""
    return Path(str(resources.files("selfinterp") / "resources" / "catalog.json"))


def parse_catalog(raw: Any, source: str = "catalog") -> list[Scenario]:
    """Validate a decoded catalog and return its scenarios; raise UserError naming the bad entry."""
    if not isinstance(raw, list) or not raw:
        raise UserError(f"{source}: expected a non-empty JSON list of scenarios")
    scenarios = []
    for i, entry in enumerate(raw):
        where = f"{source}: scenario {i}"
        if not isinstance(entry, dict):
            raise UserError(f"{where}: expected an object, got {type(entry).__name__}")
        if "short_name" in entry:
            where = f"{where} ({entry['short_name']!r})"
        for key in ("short_name", "question", "attributes"):
            if key not in entry:
                raise UserError(f"{where}: missing key {key!r}")
        if not isinstance(entry["question"], str) or not entry["question"].strip():
            raise UserError(f"{where}: 'question' must be a non-empty string")
        attrs = entry["attributes"]
        if not isinstance(attrs, list) or len(attrs) != N_ATTRIBUTES:
            n = len(attrs) if isinstance(attrs, list) else "no list of"
            raise UserError(f"{where}: needs exactly {N_ATTRIBUTES} attributes, has {n}")
        parsed = tuple(_parse_attribute(a, f"{where}, attribute {j}") for j, a in enumerate(attrs))
        names = [a.name for a in parsed]
        if len(set(names)) != len(names):
            raise UserError(f"{where}: attribute names must be unique, got {names}")
        scenarios.append(Scenario(str(entry["short_name"]), entry["question"], parsed))
    return scenarios


def _parse_attribute(raw: Any, where: str) -> Attribute:
    if not isinstance(raw, dict):
        raise UserError(f"{where}: expected an object")
    for key in ("name", "units", "range"):
        if key not in raw:
            raise UserError(f"{where}: missing key {key!r}")
    name, units, rng = raw["name"], raw["units"], raw["range"]
    if not isinstance(name, str) or not name.strip():
        raise UserError(f"{where}: 'name' must be a non-empty string")
    if not isinstance(units, str):
        raise UserError(f"{where} ({name!r}): 'units' must be a string (it may be empty)")
    ok = (
        isinstance(rng, list)
        and len(rng) == 2
        and all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in rng)
        and all(math.isfinite(v) for v in rng)
    )
    if not ok:
        raise UserError(f"{where} ({name!r}): 'range' must be [min, max] numbers, got {rng!r}")
    if not rng[0] < rng[1]:
        raise UserError(f"{where} ({name!r}): range min must be below max, got {rng!r}")
    return Attribute(name, units, float(rng[0]), float(rng[1]))


def load_catalog(path: str | Path | None = None) -> list[Scenario]:
    """Read and validate a catalog file (default: the project's own)."""
    path = Path(path) if path else default_catalog_path()
    if not path.is_file():
        raise UserError(f"catalog {path} does not exist; pass --catalog with a JSON file")
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise UserError(f"catalog {path} is not valid UTF-8 JSON: {e}") from None
    return parse_catalog(raw, str(path))


def apply_roles(scenarios: Sequence[Scenario], roles: Sequence[str]) -> list[Scenario]:
    """Prefix each question with a role: scenario i gets ``Imagine you are {roles[i]}.``."""
    if len(roles) < len(scenarios):
        raise UserError(f"roles file has {len(roles)} roles but {len(scenarios)} scenarios need one each")
    return [replace(s, question=f"Imagine you are {r}. {s.question}") for s, r in zip(scenarios, roles)]
