"""Faults under MPI: nothing hangs, writers fail on all ranks, checkpoints know their run.

The ``mpiexec`` tests (serial-only: they start their own 2-rank job) run
``tests/mpi_scripts/fault_driver.py`` with a timeout and check that the job ENDS with a
non-zero exit code and a clear message. The in-process tests run serially and under
``mpiexec -n 2 python -m pytest``.
"""

import nngf_fem as nf
from nngf_fem import io as nio
from nngf_fem import mpi as nmpi

import errno
import json
import os
import pathlib
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch
import ufl
from dolfinx import mesh
from mpi4py import MPI

DRIVER = pathlib.Path(__file__).resolve().parent / "mpi_scripts" / "fault_driver.py"
MPIEXEC = pathlib.Path(sys.executable).parent / "mpiexec"
TIMEOUT = 120


# ------------------------------------------------------------ mpiexec jobs
def _env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("NNGF_FEM_")}
    env.update({"OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1",
                # rank 0 reports collective errors; the others wait this long first
                "NNGF_FEM_COLLECTIVE_ERROR_GRACE": "60"}, **extra)
    return env


def _kill_job(proc: subprocess.Popen, log: pathlib.Path) -> None:
    """End a job that hung: hydra's double Ctrl-C, then SIGKILL to every rank it printed."""
    for _ in range(2):
        try:
            os.killpg(proc.pid, signal.SIGINT)
        except ProcessLookupError:
            break
        time.sleep(1.0)
    for line in log.read_text(errors="replace").splitlines():
        parts = line.split()
        if len(parts) == 3 and parts[0] == "pid":
            try:
                os.kill(int(parts[2]), signal.SIGKILL)
            except (ProcessLookupError, ValueError):
                pass
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    proc.wait(timeout=30)


def _start(mode: str, out: pathlib.Path, log: pathlib.Path, **env: str) -> subprocess.Popen:
    if not MPIEXEC.exists():
        pytest.skip(f"no mpiexec next to {sys.executable}")
    with log.open("w") as fh:
        return subprocess.Popen([str(MPIEXEC), "-n", "2", sys.executable, str(DRIVER), mode,
                                 str(out)], stdout=fh, stderr=subprocess.STDOUT,
                                stdin=subprocess.DEVNULL, env=_env(**env),
                                start_new_session=True)


def _wait(proc: subprocess.Popen, log: pathlib.Path, timeout: float) -> tuple[int, str]:
    try:
        rc = proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        _kill_job(proc, log)
        pytest.fail(f"the MPI job hung (no end within {timeout} s):\n"
                    f"{log.read_text(errors='replace')[-3000:]}")
    return rc, log.read_text(errors="replace")


def _run_job(mode: str, tmp_path: pathlib.Path, **env: str) -> tuple[int, str]:
    log = tmp_path / f"{mode}.log"
    return _wait(_start(mode, tmp_path / "out", log, **env), log, TIMEOUT)


@pytest.mark.skip_in_parallel
@pytest.mark.parametrize("mode,rank,message", [
    ("raise_rank1", 1, "ValueError: deliberate failure on rank 1"),
    ("raise_rank0", 0, "ValueError: deliberate failure on rank 0"),
    ("raise_in_callback", 1, "RuntimeError: deliberate callback failure on rank 1"),
])
def test_exception_on_one_rank_aborts_the_job(tmp_path, mode, rank, message):
    rc, out = _run_job(mode, tmp_path)
    assert rc != 0, out
    assert f"[rank {rank}/2] {message}" in out, f"rc={rc}\n{out}"
    assert f"uncaught {message.split(':')[0]} on rank {rank}; aborting all 2 MPI ranks" in out
    assert "finished without the expected failure" not in out


@pytest.mark.skip_in_parallel
def test_cache_decision_is_collective(tmp_path):
    """The control changes by round-off on one rank only: every rank solves again (a
    cache hit on one rank and a solve on the other deadlocked after network growth)."""
    rc, out = _run_job("cache_differs_on_one_rank", tmp_path)
    assert rc == 0, out
    assert "cache ok 0" in out and "cache ok 1" in out, out


@pytest.mark.skip_in_parallel
@pytest.mark.parametrize("mode,message", [
    ("checkpoint_is_directory", r"cannot write checkpoint \S*checkpoint.pt: IsADirectoryError"),
    ("history_is_directory", r"cannot write history \S*history.json: IsADirectoryError"),
    ("vtx_parent_is_file", r"cannot write fields \S*not_a_folder/u.bp: "),
    ("checkpoint_disk_full", r"cannot write checkpoint \S*checkpoint.pt: RuntimeError: .*"
                             "failed writing file"),
    ("history_disk_full", r"cannot write history \S*history.json: OSError: \[Errno 28\]"),
])
def test_writer_failure_on_rank_0_ends_the_job(tmp_path, mode, message):
    import re

    rc, out = _run_job(mode, tmp_path)
    assert rc != 0, out
    rank0 = [ln for ln in out.splitlines() if ln.startswith("[rank 0/2] OSError: ")]
    assert rank0, f"rc={rc}\n{out}"
    assert re.search(message, rank0[0]), rank0[0]
    assert rank0[0].endswith("(on rank(s) 0)")
    assert "[rank 1/2]" not in out  # a collective error: rank 0 reports it alone
    leftovers = [p for p in (tmp_path / "out").rglob("*") if ".tmp" in p.name]
    assert not leftovers
    if mode == "checkpoint_disk_full":
        assert not (tmp_path / "out" / "checkpoint.pt").exists()


def _start_and_wait_ready(mode: str, tmp_path: pathlib.Path, **env: str):
    log = tmp_path / f"{mode}.log"
    proc = _start(mode, tmp_path / "out", log, **env)
    deadline = time.monotonic() + TIMEOUT
    while time.monotonic() < deadline and proc.poll() is None:
        if log.read_text(errors="replace").count("ready ") >= 2:
            break
        time.sleep(0.1)
    else:
        if proc.poll() is None:
            _kill_job(proc, log)
        pytest.fail(f"the job did not get ready:\n{log.read_text(errors='replace')[-3000:]}")
    time.sleep(0.5)  # both ranks are in their loop / collective
    return proc, log


@pytest.mark.skip_in_parallel
def test_sigint_ends_the_job_on_all_ranks(tmp_path):
    """Ctrl-C: rank 1 gets KeyboardInterrupt; its abort ends rank 0 blocked in a Barrier."""
    proc, log = _start_and_wait_ready("sigint", tmp_path)
    os.killpg(proc.pid, signal.SIGINT)
    rc, out = _wait(proc, log, 60)
    assert rc == 130, out
    assert "[rank 1/2] KeyboardInterrupt" in out, out
    assert "uncaught KeyboardInterrupt on rank 1; aborting all 2 MPI ranks" in out


@pytest.mark.skip_in_parallel
def test_sigint_ends_the_job_when_every_rank_is_blocked_in_mpi(tmp_path):
    """No rank can run Python code: the SIGINT watchdog aborts after the grace period."""
    proc, log = _start_and_wait_ready("sigint_all_blocked", tmp_path,
                                      NNGF_FEM_SIGINT_GRACE="2")
    os.killpg(proc.pid, signal.SIGINT)
    rc, out = _wait(proc, log, 60)
    assert rc == 130, out
    assert "still running 2 s after SIGINT" in out, out


# ------------------------------------------------------- abort hook (in process)
def test_install_excepthook_is_idempotent_and_chains_serially(monkeypatch):
    seen = []
    monkeypatch.setattr(sys, "excepthook", lambda *a: seen.append(a[0]))
    monkeypatch.setattr(nmpi, "_installed_comm", None)
    assert nf.install_excepthook(MPI.COMM_SELF) is True
    assert nf.install_excepthook(MPI.COMM_SELF) is False
    assert nf.install_excepthook(MPI.COMM_WORLD) is False
    sys.excepthook(ValueError, ValueError("x"), None)  # size 1: the previous hook runs
    assert seen == [ValueError]


def test_hook_installed_on_import_under_mpi():
    hooked = getattr(sys.excepthook, "_nngf_fem_abort_hook", False)
    assert hooked == (MPI.COMM_WORLD.size > 1)


def test_abort_hook_opt_out_by_environment(monkeypatch):
    calls = []
    monkeypatch.setattr(nmpi, "install_excepthook", lambda comm: calls.append(comm))
    monkeypatch.setenv("NNGF_FEM_NO_ABORT_HOOK", "1")
    nmpi._auto_install()
    assert calls == []
    monkeypatch.delenv("NNGF_FEM_NO_ABORT_HOOK")
    nmpi._auto_install()
    assert len(calls) == (1 if MPI.COMM_WORLD.size > 1 else 0)


def test_raise_on_any_marks_collective_errors():
    comm = MPI.COMM_WORLD
    with pytest.raises(OSError, match=r"disk full") as info:
        nmpi.raise_on_any(comm, comm.rank == 0, "disk full", OSError)
    assert getattr(info.value, nmpi.COLLECTIVE_ATTR) is True
    with pytest.raises(ValueError, match="boom"):
        nmpi.run_on_root(comm, lambda: (_ for _ in ()).throw(KeyError("boom")), "", ValueError)


# ------------------------------------------------------- writers (in process)
def _flow(n: int = 4, width: int = 4, transform: str = "identity", energy: str = "regression",
          seed: int = 0, **flow_kwargs) -> nf.NaturalGradientFlow:
    msh = mesh.create_unit_square(MPI.COMM_WORLD, n, n)
    torch.manual_seed(seed)
    u = nf.NeuralField(msh, nf.MLP(2, width), transform=transform)
    x = ufl.SpatialCoordinate(msh)
    if energy == "regression":
        e = nf.RegressionEnergy(u, 1.0 + x[0] * x[1], norm="H1")
    else:
        e = nf.FunctionalEnergy(u, 0.5 * (u.ufl - x[0]) ** 2 * ufl.dx)
    return nf.NaturalGradientFlow(e, **flow_kwargs)


def _on_root_mkdir(p: pathlib.Path) -> None:
    if MPI.COMM_WORLD.rank == 0:
        p.mkdir(parents=True)
    MPI.COMM_WORLD.Barrier()


def _no_temporaries(folder: pathlib.Path) -> bool:
    ok = True
    if MPI.COMM_WORLD.rank == 0:
        ok = not [p for p in folder.rglob("*") if ".tmp" in p.name]
    return MPI.COMM_WORLD.bcast(ok, root=0)


def test_save_checkpoint_to_a_directory_raises_on_all_ranks(tempdir):
    flow = _flow()
    _on_root_mkdir(tempdir / "c.pt")
    with pytest.raises(OSError, match=r"cannot write checkpoint \S*c\.pt: IsADirectoryError"):
        nf.save_checkpoint(tempdir / "c.pt", flow)
    assert _no_temporaries(tempdir)


def test_checkpoint_disk_full_raises_on_all_ranks_and_keeps_the_old_file(tempdir, monkeypatch):
    flow = _flow()
    flow.run(1)
    ckpt = tempdir / "c.pt"
    nf.save_checkpoint(ckpt, flow)
    flow.run(2)

    def full_disk(obj, f, *args, **kwargs):
        f.write(b"partial")
        raise RuntimeError("PytorchStreamWriter failed writing file data/0: file write failed")

    monkeypatch.setattr(torch, "save", full_disk)
    with pytest.raises(OSError, match=r"cannot write checkpoint \S*c\.pt: RuntimeError"):
        nf.save_checkpoint(ckpt, flow)
    monkeypatch.undo()
    assert _no_temporaries(tempdir)
    fresh = _flow()
    nf.load_checkpoint(ckpt, fresh)
    assert fresh.iteration == 1


def test_history_and_plot_writers_raise_on_all_ranks(tempdir, monkeypatch):
    hist = [{"iteration": 0, "energy": 1.0, "alignment": 0.5, "n_params": 3}]
    _on_root_mkdir(tempdir / "a" / "history.json")
    with pytest.raises(OSError, match=r"cannot write history \S*history\.json"):
        nio.write_history(tempdir / "a", hist, MPI.COMM_WORLD)
    _on_root_mkdir(tempdir / "b" / "history.png")
    with pytest.raises(OSError, match=r"cannot write plot \S*history\.png"):
        nio.plot_history(tempdir / "b" / "history.png", hist, MPI.COMM_WORLD)
    # disk full in the middle of the JSON: the previous file stays complete
    nio.write_history(tempdir / "c", hist, MPI.COMM_WORLD, meta={"v": 1})

    def full_disk(tmp, text):
        tmp.write_text(text[: len(text) // 2])
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(tmp))

    monkeypatch.setattr(nio, "_write_text_synced", full_disk)
    with pytest.raises(OSError, match=r"history\.json: OSError: \[Errno 28\]"):
        nio.write_history(tempdir / "c", hist * 2, MPI.COMM_WORLD, meta={"v": 2})
    monkeypatch.undo()
    if MPI.COMM_WORLD.rank == 0:
        assert json.loads((tempdir / "c" / "history.json").read_text())["meta"] == {"v": 1}
    assert _no_temporaries(tempdir)


def test_field_writers_refuse_bad_targets_on_all_ranks(tempdir):
    flow = _flow()
    f = flow.field.function
    comm = MPI.COMM_WORLD
    if comm.rank == 0:
        (tempdir / "results").mkdir()
        (tempdir / "results" / "keep.txt").write_text("user data")
        (tempdir / "plain").write_text("x")
    comm.Barrier()
    with pytest.raises(OSError, match=r"results exists and is not a VTX"):
        nio.write_fields(tempdir / "results", [f])
    with pytest.raises(OSError, match=r"cannot write fields \S*plain/u\.bp"):
        nio.write_fields(tempdir / "plain" / "u.bp", [f])
    _on_root_mkdir(tempdir / "u.xdmf")
    with pytest.raises(OSError, match=r"u\.xdmf is a directory"):
        nio.write_fields(tempdir / "u.xdmf", [f], engine="xdmf")
    with pytest.raises(OSError, match=r"cannot write plot \S*results"):
        nio.plot_fields(tempdir / "results", [("u", f)])
    if comm.rank == 0:
        assert (tempdir / "results" / "keep.txt").read_text() == "user data"
    # a VTX folder is replaced by a new one
    p = nio.write_fields(tempdir / "u.bp", [f])
    nio.write_fields(p, [f])
    assert _no_temporaries(tempdir)


def _dead_pid() -> int:
    try:
        return int(pathlib.Path("/proc/sys/kernel/pid_max").read_text()) + 1
    except (OSError, ValueError):
        return 2**22 + 1


def test_stale_temporaries_of_killed_writers_are_removed(tempdir):
    comm = MPI.COMM_WORLD
    dead, live = _dead_pid(), os.getppid()
    stale = [f"checkpoint.pt.tmp{dead}", f".checkpoint.pt.tmp{dead}.pt",
             f".history.json.tmp{dead}", f".history.csv.tmp{dead}.csv",
             f".history.tmp{dead}.png", f".history.png.tmp{dead}.png"]
    kept = [f".checkpoint.pt.tmp{live}.pt", f"other.pt.tmp{dead}", "checkpoint.pt.tmpX"]
    if comm.rank == 0:
        for name in stale + kept:
            (tempdir / name).write_bytes(b"half")
        (tempdir / f".u.bp.tmp{dead}.bp").mkdir()
        (tempdir / f".u.bp.tmp{dead}.bp" / "data.0").write_bytes(b"half")
    comm.Barrier()
    flow = _flow()
    nf.save_checkpoint(tempdir / "checkpoint.pt", flow)
    hist = [{"iteration": 0, "energy": 1.0, "alignment": 0.5, "n_params": 3}]
    nio.write_history(tempdir, hist, comm)
    nio.plot_history(tempdir / "history.png", hist, comm)
    nio.write_fields(tempdir / "u.bp", [flow.field.function])
    if comm.rank == 0:
        names = {p.name for p in tempdir.iterdir()}
        assert not names & (set(stale) | {f".u.bp.tmp{dead}.bp"})
        assert set(kept) <= names
        assert nio.remove_stale_temporaries(tempdir / "checkpoint.pt") == []
        (tempdir / f"checkpoint.pt.tmp{dead}").write_bytes(b"half")
    comm.Barrier()
    nf.load_checkpoint(tempdir / "checkpoint.pt", _flow())  # loading cleans as well
    if comm.rank == 0:
        assert not (tempdir / f"checkpoint.pt.tmp{dead}").exists()


# --------------------------------------------------- checkpoint provenance
@pytest.mark.parametrize("change,item", [
    ({"width": 5}, "parameter shapes"),
    ({"n": 5}, "mesh cells"),
    ({"transform": "exp"}, "transform"),
    ({"energy": "functional"}, "energy"),
    ({"attr": ("curvature", "lbfgs")},  # as a flow of another kind would have
     r"curvature: 'none' in the checkpoint vs 'lbfgs' in this run"),
    ({"meta": {"demo": "other"}}, r"checkpoint_meta\['demo'\]: 'ritz' in the checkpoint vs "
                                  r"'other' in this run"),
    ({"meta": {"demo": "ritz", "width": 4}}, r"checkpoint_meta\['width'\]: missing in the "
                                             "checkpoint"),
])
def test_load_checkpoint_refuses_another_run(tempdir, change, item):
    flow = _flow()
    flow.checkpoint_meta = {"demo": "ritz"}
    flow.run(1)
    nf.save_checkpoint(tempdir / "c.pt", flow)
    meta = change.pop("meta", {"demo": "ritz"})
    attr = change.pop("attr", None)
    other = _flow(**change)
    other.checkpoint_meta = meta
    if attr is not None:
        setattr(other, *attr)
    theta = other.field.get_parameters()
    with pytest.raises(ValueError, match=rf"belongs to another run \({item}"):
        nf.load_checkpoint(tempdir / "c.pt", other)
    np.testing.assert_array_equal(other.field.get_parameters(), theta)  # left untouched
    assert other.iteration == 0


def test_checkpoint_provenance_survives_expansion(tempdir):
    """A grown network still matches a fresh flow of the same run (shapes at creation)."""
    flow = _flow()
    flow.run(2)
    nf.ExpansionPolicy(neurons=2, n_candidates=16).expand(flow)
    nf.save_checkpoint(tempdir / "c.pt", flow)
    fresh = _flow()
    nf.load_checkpoint(tempdir / "c.pt", fresh)
    assert fresh.field.num_params == flow.field.num_params > _flow().field.num_params


def test_old_checkpoint_format_is_refused_clearly(tempdir):
    if MPI.COMM_WORLD.rank == 0:
        torch.save({"format": 1, "module": None, "flow": {}, "extra": {}}, tempdir / "old.pt")
    MPI.COMM_WORLD.Barrier()
    with pytest.raises(ValueError, match=r"format 1; this version reads format 2"):
        nf.load_checkpoint(tempdir / "old.pt", _flow())


def test_counters_and_parameters_survive_save_and_load(tempdir):
    comm = MPI.COMM_WORLD
    flow = _flow()
    flow.run(3)
    counters = dict(flow.energy.counters)
    assert counters["value"] > 0 and counters["derivative"] > 0
    nf.save_checkpoint(tempdir / "c.pt", flow)
    fresh = _flow(seed=comm.rank + 7)  # deliberately different parameters on each rank
    nf.load_checkpoint(tempdir / "c.pt", fresh)
    assert fresh.energy.counters == counters
    theta = fresh.field.get_parameters()
    np.testing.assert_array_equal(theta, flow.field.get_parameters())
    for other in comm.allgather(theta):  # identical on all ranks by construction
        np.testing.assert_array_equal(other, theta)
    fresh.run(4)
    assert fresh.energy.counters["derivative"] > counters["derivative"]
