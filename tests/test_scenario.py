"""Scenario validation: every bad key named, flags over file values, durations."""

from pathlib import Path

import pytest

from loadgen.scenario import ScenarioError, apply_overrides, load_scenario, parse_duration

SCENARIOS = Path(__file__).resolve().parent.parent / "scenarios"


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "s.toml"
    path.write_text(text)
    return path


@pytest.mark.parametrize("path", sorted(SCENARIOS.glob("*.toml")), ids=lambda p: p.name)
def test_shipped_scenarios_validate(path: Path) -> None:
    assert load_scenario(path).pattern.total_duration > 0


def test_every_bad_key_is_named_at_once(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        '[target]\nurl = "http://127.0.0.1:1"\nmodel = "m"\nmodle = "x"\n'
        '[open_loop]\nrate = -5\nduration = "abc"\nseed = "x"\n',
    )
    with pytest.raises(ScenarioError) as info:
        load_scenario(path)
    problems = info.value.problems
    assert len(problems) == 4
    text = str(info.value)
    for key in ("target.modle", "open_loop.rate", "open_loop.duration", "open_loop.seed"):
        assert key in text
    assert "unknown key" in text and "-5" in text
    assert info.value.exit_code == 2


def test_other_patterns_key_is_unknown(tmp_path: Path) -> None:
    path = write(tmp_path, '[target]\nurl="http://h"\nmodel="m"\n[open_loop]\nrate=1\nduration=1\nusers=3\n')
    with pytest.raises(ScenarioError, match=r"open_loop\.users: unknown key"):
        load_scenario(path)


def test_exactly_one_pattern(tmp_path: Path) -> None:
    path = write(tmp_path, '[target]\nurl="http://h"\nmodel="m"\n')
    with pytest.raises(ScenarioError, match="exactly one load pattern"):
        load_scenario(path)


def test_invalid_toml_is_a_scenario_error(tmp_path: Path) -> None:
    with pytest.raises(ScenarioError, match="not valid TOML"):
        load_scenario(write(tmp_path, "[target\n"))


def test_flags_override_file_values() -> None:
    scenario = load_scenario(
        SCENARIOS / "poisson-kserve.toml",
        {"open_loop.rate": 50.0, "open_loop.duration": "5s", "target.model": "mlp"},
    )
    assert scenario.open_loop.rate == 50.0
    assert scenario.open_loop.total_duration == 5.0
    assert scenario.open_loop.arrival == "poisson"
    assert scenario.target.model == "mlp"


def test_users_flag_switches_to_closed_loop_keeping_duration() -> None:
    scenario = load_scenario(SCENARIOS / "poisson-kserve.toml", {"closed_loop.users": 4})
    assert scenario.open_loop is None
    assert scenario.closed_loop.users == 4
    assert scenario.closed_loop.duration == 30.0


def test_flags_alone_make_a_scenario() -> None:
    data = apply_overrides({}, {"target.url": "http://h:1", "target.model": "m",
                                "closed_loop.users": 2, "open_loop.duration": "2s"})
    assert data == {"target": {"url": "http://h:1", "model": "m"},
                    "closed_loop": {"users": 2, "duration": "2s"}}


@pytest.mark.parametrize(
    ("text", "seconds"), [("500ms", 0.5), ("30s", 30.0), ("2m", 120.0), ("1h", 3600.0), (7, 7.0), ("1.5", 1.5)]
)
def test_parse_duration(text: object, seconds: float) -> None:
    assert parse_duration(text) == seconds


@pytest.mark.parametrize("text", ["abc", "5 min", True, "", "-3s"])
def test_parse_duration_rejects(text: object) -> None:
    with pytest.raises(ValueError):
        parse_duration(text)


def test_stage_needs_rate_or_ramp(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        '[target]\nurl="http://h"\nmodel="m"\n[open_loop]\n'
        'stages = [{duration="1s", rate=3, ramp_to=5}, {duration="x", rate=1}]\n',
    )
    with pytest.raises(ScenarioError) as info:
        load_scenario(path)
    text = str(info.value)
    assert "open_loop.stages.0" in text and "open_loop.stages.1.duration" in text


def test_metrics_port_is_validated() -> None:
    base = {"target.url": "http://127.0.0.1:8000", "target.model": "m", "open_loop.rate": 10,
            "open_loop.duration": "1s"}
    assert load_scenario(None, base).output.metrics_port is None
    assert load_scenario(None, {**base, "output.metrics_port": 0}).output.metrics_port == 0
    with pytest.raises(ScenarioError) as caught:
        load_scenario(None, {**base, "output.metrics_port": 70000})
    assert any(p.startswith("output.metrics_port:") for p in caught.value.problems)
