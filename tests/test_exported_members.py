"""The public surface: each package's __all__ lists exactly its public names, and they import."""

import subprocess
import sys

import pytest

import loadgen
import servers


@pytest.mark.parametrize("package", [loadgen, servers], ids=lambda p: p.__name__)
def test_all_matches_public_names(package) -> None:
    public = {name for name in vars(package) if not name.startswith("_")} - {"annotations"}
    modules = {name for name in public if type(getattr(package, name)).__name__ == "module"}
    assert set(package.__all__) - {"__version__"} == public - modules
    for name in package.__all__:
        assert hasattr(package, name)


def test_importing_loadgen_does_not_import_locust() -> None:
    code = "import loadgen, sys; print('locust' in sys.modules, 'gevent' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["False", "False"]
