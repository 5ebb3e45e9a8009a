"""The public surface: each package's __all__ lists exactly its public names, and they import."""

import subprocess
import sys

import pytest

import loadgen
import servers


@pytest.mark.parametrize("package", [loadgen, servers], ids=lambda p: p.__name__)
def test_all_matches_public_names(package) -> None:
    public = {name for name in dir(package) if not name.startswith("_")} - {"annotations"}
    modules = {name for name in public if type(getattr(package, name)).__name__ == "module"}
    assert set(package.__all__) - {"__version__"} == public - modules
    for name in package.__all__:
        assert hasattr(package, name)


def test_importing_loadgen_does_not_import_locust() -> None:
    code = "import loadgen, sys; print('locust' in sys.modules, 'gevent' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["False", "False"]


def test_lowlevel_imports_neither_the_generator_nor_the_servers() -> None:
    """loadgen's public names load lazily: a server importing loadgen.lowlevel gets only that."""
    code = ("import sys; import loadgen.lowlevel.timerfd, loadgen.lowlevel.precise_timer, "
            "loadgen.lowlevel.keepawake, loadgen.lowlevel.dtypes; "
            "print(sorted(m for m in sys.modules if m.split('.')[0] in ('loadgen', 'servers', 'pydantic', "
            "'hdrh', 'locust')))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == str(["loadgen", "loadgen.lowlevel",
                                      "loadgen.lowlevel.dtypes", "loadgen.lowlevel.keepawake", "loadgen.lowlevel.precise_timer",
                                      "loadgen.lowlevel.timerfd"])


def test_loadgen_imports_nothing_from_servers() -> None:
    """The generator, all of it imported, has not imported the reference servers."""
    code = ("import pkgutil, importlib, sys, loadgen; "
            "[importlib.import_module(m.name) for m in pkgutil.walk_packages(loadgen.__path__, 'loadgen.') "
            "if not m.name.endswith(('__main__', '.generate'))]; "
            "print(sorted(m for m in sys.modules if m.split('.')[0] == 'servers'))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"
