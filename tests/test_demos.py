"""Every demo runs small (in-process, so serially and under mpiexec with the suite)."""

import pathlib
import runpy
import sys

import numpy as np
import pytest
from mpi4py import MPI

DEMOS = pathlib.Path(__file__).resolve().parents[1] / "demos"

CASES = {
    "demo_poisson.py": ["--n", "16"],
    "demo_ritz_poisson.py": ["--n", "6", "--degree", "3", "--width", "16", "--iterations", "20",
                             "--tol", "1e-3", "--quiet"],
    "demo_darcy_inversion.py": ["--n", "8", "--expand", "--max-width", "6", "--iterations", "8",
                                "--tol", "0.3", "--quiet"],
    "demo_regression.py": ["--n", "8", "--width", "8", "--iterations", "10",
                           "--methods", "H1,Euclidean,Adam,LBFGS", "--expand"],
    "demo_parametric.py": ["--n", "8", "--train", "3", "--test", "3", "--width", "8",
                           "--iterations", "15", "--nystrom-rank", "16", "--adam", "--pod", "2",
                           "--tol", "0.5", "--quiet"],
}


VARIANTS = {  # presets of demo_darcy_inversion.py
    "demo_nonlinear_inversion.py": ["--n", "8", "--width", "4", "--iterations", "6",
                                    "--tol", "0.4", "--quiet"],
    "demo_gmsh_inversion.py": ["--width", "4", "--iterations", "6", "--tol", "0.4", "--quiet"],
}


@pytest.mark.parametrize("name", sorted(CASES) + sorted(VARIANTS))
def test_demo_runs_small(name, tempdir, monkeypatch):
    args = list(CASES.get(name) or VARIANTS[name])
    name = name.split()[0]
    if name != "demo_poisson.py":
        args += ["--out", str(tempdir / name.removesuffix(".py"))]
    monkeypatch.setattr(sys, "argv", [name, *args])
    runpy.run_path(str(DEMOS / name), run_name="__main__")
    MPI.COMM_WORLD.Barrier()
    if name != "demo_poisson.py":
        out = tempdir / name.removesuffix(".py")
        assert any(out.glob("*.json"))


def test_every_demo_is_covered():
    assert {p.name for p in DEMOS.glob("demo_*.py")} == set(CASES) | set(VARIANTS)


@pytest.mark.skip_in_parallel
def test_demo_runs_as_standalone_script(tempdir):
    """A fresh interpreter (no conftest imports): catches import-order regressions."""
    import subprocess

    res = subprocess.run([sys.executable, str(DEMOS / "demo_ritz_poisson.py"), *CASES[
        "demo_ritz_poisson.py"], "--out", str(tempdir / "standalone")],
        capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    assert (tempdir / "standalone" / "history.png").exists()


@pytest.mark.skip_in_parallel
def test_killed_run_resumes_to_the_same_result(tempdir):
    """SIGTERM mid-run, then --resume: same final parameters as an uninterrupted run."""
    import signal
    import subprocess
    import time

    import torch

    args = [sys.executable, str(DEMOS / "demo_ritz_poisson.py"), "--n", "6", "--degree", "3",
            "--width", "16", "--iterations", "60", "--checkpoint-every", "1", "--tol", "1",
            "--quiet"]
    ref_dir, run_dir = tempdir / "ref", tempdir / "killed"
    subprocess.run([*args, "--out", str(ref_dir)], check=True, timeout=600,
                   capture_output=True)
    proc = subprocess.Popen([*args, "--out", str(run_dir)], stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    ckpt = run_dir / "checkpoint.pt"
    deadline = time.time() + 300
    while time.time() < deadline and proc.poll() is None:
        if ckpt.exists() and torch.load(ckpt, weights_only=False)["flow"]["iteration"] >= 5:
            proc.send_signal(signal.SIGTERM)
            break
        time.sleep(0.05)
    # killed by the signal (-15), or exited 15 from MPI's SIGTERM handler; 0 = finished early
    assert proc.wait(timeout=60) in (-signal.SIGTERM, signal.SIGTERM), "run was not killed"
    killed_at = torch.load(ckpt, weights_only=False)["flow"]["iteration"]
    assert 5 <= killed_at < 60
    subprocess.run([*args, "--out", str(run_dir), "--resume"], check=True, timeout=600,
                   capture_output=True)
    ref = torch.load(ref_dir / "checkpoint.pt", weights_only=False)["flow"]
    res = torch.load(ckpt, weights_only=False)["flow"]
    assert res["iteration"] == ref["iteration"] == 60
    np.testing.assert_allclose(res["parameters"], ref["parameters"], rtol=0, atol=1e-12)
    assert not list(run_dir.glob("*.tmp*"))
