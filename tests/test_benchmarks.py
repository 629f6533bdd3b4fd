"""Every benchmark script runs in its --quick form and writes its JSON (guards against rot).

The benchmarks themselves (sizes, timings) are run by ``make bench``; see BENCHMARKS.md.
"""

import json
import pathlib
import runpy
import subprocess
import sys

import pytest
from mpi4py import MPI

BENCH = pathlib.Path(__file__).resolve().parents[1] / "benchmarks"
SCRIPTS = sorted(p.name for p in BENCH.glob("b[0-9]_*.py"))
#: extra quick runs of a script's other modes: (script, extra arguments)
MODES = [("b3_darcy.py", ["--mesh-study"])]


@pytest.mark.parametrize("name,extra", [(s, []) for s in SCRIPTS if s != "b5_mpi.py"] + MODES,
                         ids=lambda v: " ".join(v) if isinstance(v, list) else v)
def test_benchmark_quick_run_writes_json(name, extra, tempdir, monkeypatch):
    out = tempdir / f"{name}{''.join(extra)}.json"
    args = [name, "--out", str(out), *extra]
    if name != "b6_network_size.py":
        args.append("--quick")
    else:
        args += ["--n", "8", "--widths", "4,8", "--repeats", "1"]
    monkeypatch.setattr(sys, "argv", args)
    monkeypatch.syspath_prepend(str(BENCH))
    runpy.run_path(str(BENCH / name), run_name="__main__")
    MPI.COMM_WORLD.Barrier()
    data = json.loads(out.read_text())
    assert data["env"]["ranks"] == MPI.COMM_WORLD.size
    assert data["rows"] or data.get("methods")


@pytest.mark.skip_in_parallel
def test_mpi_benchmark_compares_one_and_two_ranks(tempdir):
    out = tempdir / "b5.json"
    res = subprocess.run([sys.executable, str(BENCH / "b5_mpi.py"), "--quick", "--out", str(out)],
                         capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    rows = json.loads(out.read_text())["rows"]
    assert [r["ranks"] for r in rows] == [1, 2]
    assert rows[1]["max_theta_diff"] < 1e-8
