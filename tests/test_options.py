"""One declaration of every option: `run` and `sweep` take the same target, protocol, pattern, output
and distributed flags (loadgen/options.py), each protocol's flags come from its own module, and every
flag with a scenario key reaches that key."""

from __future__ import annotations

from pathlib import Path

import pytest
from typer.testing import CliRunner

from loadgen.cli import app
from loadgen.options import (
    NOT_IN_COMPARE,
    NOT_IN_SWEEP,
    compare_flags,
    protocol_flags,
    run_flags,
    scenario_overrides,
    sweep_flags,
)
from loadgen.protocols import protocols
from loadgen.scenario import ScenarioError, load_scenario


def _names(flags) -> set[str]:
    return {flag.flag for flag in flags}


def test_every_run_flag_is_in_sweep_or_says_why_not() -> None:
    missing = _names(run_flags()) - _names(sweep_flags()) - set(NOT_IN_SWEEP)
    assert not missing, f"run flags missing from sweep without a reason in NOT_IN_SWEEP: {sorted(missing)}"
    assert set(NOT_IN_SWEEP) <= _names(run_flags()), "NOT_IN_SWEEP names a flag run does not have"


def test_every_run_flag_is_in_compare_or_says_why_not() -> None:
    missing = _names(run_flags()) - _names(compare_flags()) - set(NOT_IN_COMPARE)
    assert not missing, f"run flags missing from compare without a reason in NOT_IN_COMPARE: {sorted(missing)}"
    assert set(NOT_IN_COMPARE) <= _names(run_flags())
    plan = _names(sweep_flags()) - _names(run_flags())
    assert plan - {"--users"} <= _names(compare_flags()), "compare --sweep takes the sweep's plan flags"


def test_sweep_help_offers_every_target_and_payload_option_of_run() -> None:
    result = CliRunner().invoke(app, ["sweep", "--help"], terminal_width=240, env={"COLUMNS": "240"})
    assert result.exit_code == 0, result.output
    for flag in ("--header", "--bearer-token-env", "--ca-file", "--input-data", "--shape", "--batch-size",
                 "--timeout", "--connect-timeout", "--seed", "--max-tokens", "--prompt-file", "--tensor-format",
                 "--payload", "--content-type", "--grpc-stream", "--check-response", "--think-time"):
        assert flag in result.output, flag
    run_help = CliRunner().invoke(app, ["run", "--help"], terminal_width=240, env={"COLUMNS": "240"}).output
    for flag in _names(run_flags()) - set(NOT_IN_SWEEP):
        assert flag in run_help and flag in result.output, flag


def test_each_protocol_flag_comes_from_its_protocol_module() -> None:
    declared = {flag.name for spec in protocols().values() for flag in spec.flags}
    merged = {flag.name: flag for flag in protocol_flags()}
    assert declared == set(merged)
    shape = merged["shape"]
    assert shape.help.startswith("kserve-http, kserve-grpc:") or shape.help.startswith("kserve-grpc, kserve-http:")


def test_every_target_key_of_the_table_exists() -> None:
    """Each flag keyed into [target] names a key of every protocol that owns it (all protocols for the
    common flags)."""
    owners: dict[str, list[str]] = {}
    for name, spec in protocols().items():
        for flag in spec.flags:
            owners.setdefault(flag.name, []).append(name)
    for flag in (*run_flags(), *sweep_flags()):
        if flag.key is None or flag.key[0] != "target":
            continue
        for protocol in owners.get(flag.name, list(protocols())):
            model = protocols()[protocol].options
            assert flag.key[1] in model.model_fields, f"{flag.flag} -> target.{flag.key[1]}: not a key of {protocol}"


def test_flag_values_convert_or_name_the_flag() -> None:
    flags = run_flags()
    given = scenario_overrides(flags, {"header": ["X-Key: 1"], "shape": ["INPUT0:1,16"], "rate": 5.0,
                                       "check_response": False, "grpc_stream": True})
    assert given[("target", "headers")] == {"X-Key": "1"}
    assert given[("target", "shapes")] == {"INPUT0": [1, 16]}
    assert given[("target", "stream")] is True and ("target", "check_response") not in given
    with pytest.raises(ScenarioError, match="--header"):
        scenario_overrides(flags, {"header": ["no colon"]})
    with pytest.raises(ScenarioError, match="--shape"):
        scenario_overrides(flags, {"shape": ["INPUT0:x"]})


def test_the_overrides_make_the_scenario(tmp_path: Path) -> None:
    overrides = scenario_overrides(run_flags(), {"target": "http://127.0.0.1:8000", "model": "mlp", "rate": 50.0,
                                                  "duration": "2s", "seed": 7, "timeout": "5s", "batch_size": 4})
    scenario = load_scenario(None, overrides)
    assert scenario.target.url == "http://127.0.0.1:8000" and scenario.target.batch_size == 4
    assert scenario.pattern.rate == 50.0 and scenario.pattern.seed == 7 and scenario.target.timeout == 5.0
