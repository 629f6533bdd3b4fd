"""Every demo runs small (in-process, so serially and under mpiexec with the suite)."""

import pathlib
import runpy
import sys

import pytest
from mpi4py import MPI

DEMOS = pathlib.Path(__file__).resolve().parents[1] / "demos"

CASES = {
    "demo_poisson.py": ["--n", "16"],
    "demo_ritz_poisson.py": ["--n", "6", "--degree", "3", "--width", "16", "--iterations", "20",
                             "--tol", "1e-3", "--quiet"],
    "demo_regression.py": ["--n", "8", "--width", "8", "--iterations", "10",
                           "--methods", "H1,Euclidean,Adam,LBFGS", "--expand"],
}


@pytest.mark.parametrize("name", sorted(CASES))
def test_demo_runs_small(name, tempdir, monkeypatch):
    args = list(CASES[name])
    if name != "demo_poisson.py":
        args += ["--out", str(tempdir / name.removesuffix(".py"))]
    monkeypatch.setattr(sys, "argv", [name, *args])
    runpy.run_path(str(DEMOS / name), run_name="__main__")
    MPI.COMM_WORLD.Barrier()
    if name != "demo_poisson.py":
        out = tempdir / name.removesuffix(".py")
        assert any(out.glob("*.json"))


def test_every_demo_is_covered():
    assert {p.name for p in DEMOS.glob("demo_*.py")} == set(CASES)


@pytest.mark.skip_in_parallel
def test_demo_runs_as_standalone_script(tempdir):
    """A fresh interpreter (no conftest imports): catches import-order regressions."""
    import subprocess

    res = subprocess.run([sys.executable, str(DEMOS / "demo_ritz_poisson.py"), *CASES[
        "demo_ritz_poisson.py"], "--out", str(tempdir / "standalone")],
        capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    assert (tempdir / "standalone" / "history.png").exists()
