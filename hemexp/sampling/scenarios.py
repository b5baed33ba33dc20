"""Clinical scenarios: named edits of a patient's clinical inputs, clamped to the model's ranges."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from hemexp.core.clinical import CLINICAL_BY_NAME

UNPERTURBED = "unperturbed"


OPERATIONS = ("add", "set", "toggle")


@dataclass(frozen=True)
class Change:
    """One edit of one clinical variable: ``op`` is add, set or toggle (value unused for toggle)."""

    variable: str
    op: str
    value: float = 0.0

    def apply(self, current: float) -> float:
        if self.op == "add":
            return current + self.value
        if self.op == "set":
            return self.value
        return 1.0 - float(current >= 0.5)  # toggle a binary variable


@dataclass(frozen=True)
class Scenario:
    """A named set of clinical edits (empty for the unperturbed reference)."""

    name: str
    changes: tuple[Change, ...] = ()


def _parse_change(scenario: str, variable: str, spec: Any) -> Change:
    if variable not in CLINICAL_BY_NAME:
        raise ValueError(f"scenario {scenario!r}: unknown clinical variable {variable!r} "
                         f"(allowed: {', '.join(CLINICAL_BY_NAME)})")
    if spec == "toggle":
        if not CLINICAL_BY_NAME[variable].binary:
            raise ValueError(f"scenario {scenario!r}: toggle needs a binary variable, {variable!r} is continuous")
        return Change(variable, "toggle")
    if not (isinstance(spec, Mapping) and len(spec) == 1 and next(iter(spec)) in ("add", "set")):
        raise ValueError(f"scenario {scenario!r}, {variable}: expected {{add: x}}, {{set: x}} or 'toggle', got {spec!r}")
    op, value = next(iter(spec.items()))
    return Change(variable, op, float(value))


def parse_scenarios(spec: Mapping[str, Mapping[str, Any]]) -> dict[str, Scenario]:
    """Config mapping ``name -> {variable: op}`` to :class:`Scenario` objects (order kept)."""
    return {name: Scenario(name, tuple(_parse_change(name, var, op) for var, op in (changes or {}).items()))
            for name, changes in spec.items()}


def scenarios_from_config(evaluation_cfg: Mapping[str, Any]) -> tuple[dict[str, Scenario], dict[str, Scenario]]:
    """(single-variable scenarios incl. ``unperturbed`` first, guidance-sweep profiles) from ``cfg['evaluation']``."""
    single = {UNPERTURBED: Scenario(UNPERTURBED), **parse_scenarios(evaluation_cfg["scenarios"])}
    profiles = parse_scenarios(evaluation_cfg["profiles"])
    return single, profiles


def apply_scenario(clinical: Mapping[str, float], scenario: Scenario, clamp: bool = True) -> dict[str, float]:
    """A copy of the clinical row with the scenario applied, clamped to each variable's model range
    (``clamp=False``: the values as requested, which the out-of-distribution gate reports).

    Keys other than the seven clinical variables are passed through untouched.
    """
    out = dict(clinical)
    for change in scenario.changes:
        var = CLINICAL_BY_NAME[change.variable]
        value = change.apply(float(out[change.variable]))
        out[change.variable] = min(max(value, var.low), var.high) if clamp else value
    return out
