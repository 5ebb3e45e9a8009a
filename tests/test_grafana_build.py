"""grafana/build.py: the committed dashboards are exactly what the script makes from its panels (so a
hand edit of a dashboard's JSON fails here: change the script and run it), and its --check names the
files that are not, a stray file included."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

from tests.support.processes import ROOT

BUILD = ROOT / "grafana" / "build.py"
COMMITTED = ROOT / "grafana" / "dashboards"


def build(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, str(BUILD), *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=60, check=False)


def test_committed_dashboards_are_what_the_script_makes() -> None:
    result = build("--check")
    assert result.returncode == 0, result.stdout + result.stderr


def test_check_names_a_hand_edited_and_a_stray_dashboard(tmp_path: Path) -> None:
    made = tmp_path / "dashboards"
    made.mkdir()
    written = build("--dir", str(made))
    assert written.returncode == 0, written.stderr
    assert sorted(path.name for path in made.glob("*.json")) == sorted(
        path.name for path in COMMITTED.glob("*.json"))
    assert build("--check", "--dir", str(made)).returncode == 0

    edited = made / "loadgen-live.json"
    board = json.loads(edited.read_text())
    board["panels"][0]["targets"][0]["expr"] = "loadgen_offered_rps * 2"
    edited.write_text(json.dumps(board, indent=2) + "\n")
    shutil.copy(made / "triton-server.json", made / "hand-made.json")
    result = build("--check", "--dir", str(made))
    assert result.returncode == 1
    named = result.stderr.split("makes: ", 1)[1].splitlines()[0].split(", ")
    assert named == ["hand-made.json", "loadgen-live.json"], result.stderr

    edited.unlink()
    result = build("--check", "--dir", str(made))
    assert result.returncode == 1 and "loadgen-live.json" in result.stderr, result.stderr


def test_a_missing_folder_is_a_usage_error(tmp_path: Path) -> None:
    result = build("--check", "--dir", str(tmp_path / "absent"))
    assert result.returncode == 2 and "absent" in result.stderr, result.stderr
