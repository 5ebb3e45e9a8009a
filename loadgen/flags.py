"""A command-line flag as data: its name, type, help and the scenario key its value goes to.

The lowest layer (no typer here): protocols declare their own flags with it (loadgen/protocols/),
and loadgen/options.py declares the shared ones and turns every Flag into a typer option for each verb
that takes it. One Flag is one row of the table from flags to scenario keys: `key` is the path of the
scenario value it sets (("target", "url") is `[target] url`), and `to_scenario` converts the flag's
value into that scenario value (None: the flag was not given, the file's value stands).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

__all__ = ["Flag", "as_path_text", "if_set", "to_scenario_values"]


def if_set(value: Any) -> Any:
    """A boolean switch that only ever turns a scenario value on: False means "not given"."""
    return True if value else None


def as_path_text(value: Path | None) -> str | None:
    return str(value) if value is not None else None


@dataclass(frozen=True)
class Flag:
    """One command-line option of the verbs that send load."""

    name: str
    """The Python parameter name, e.g. "input_data" (the flag is --input-data unless `decls` says)."""
    type: Any
    """The value's type as typer reads it, e.g. `str | None`, `Path | None`, `bool`, `list[str] | None`."""
    help: str
    key: tuple[str, ...] | None = None
    """The scenario value it sets, e.g. ("target", "input_data"); None: the verb reads it itself."""
    to_scenario: Callable[[Any], Any] | None = None
    """Flag value -> scenario value (None: not given); raises ValueError naming what is wrong."""
    default: Any = None
    decls: tuple[str, ...] = ()
    """typer's parameter declarations when not just --name-with-dashes, e.g. ("--batch-size", "-b")."""
    panel: str | None = None
    """The --help panel it is listed in."""
    envvar: str | None = None
    """An environment variable that gives the value when the flag is not given (e.g. a password, kept out of
    the command line that other users of the host can list)."""

    @property
    def flag(self) -> str:
        """The long flag, e.g. "--input-data"."""
        longs = [decl for decl in self.decls if decl.startswith("--")]
        return longs[0].split("/")[0] if longs else "--" + self.name.replace("_", "-")

    def scenario_value(self, value: Any) -> Any:
        """The scenario value for the flag's `value` (None when not given)."""
        if value is None:
            return None
        return self.to_scenario(value) if self.to_scenario is not None else value


def to_scenario_values(flags: Iterable[Flag], values: dict[str, Any]) -> tuple[dict[tuple[str, ...], Any], list[str]]:
    """{scenario key: value} for the flags given among `values` (by parameter name), and the problems
    (each naming its flag) of the values that do not convert."""
    given: dict[tuple[str, ...], Any] = {}
    problems: list[str] = []
    for flag in flags:
        if flag.key is None or flag.name not in values:
            continue
        try:
            value = flag.scenario_value(values[flag.name])
        except ValueError as exc:
            problems.append(f"{flag.flag}: {exc}")
            continue
        if value is not None:
            given[flag.key] = value
    return given, problems
