"""Outputs a FEniCSx user expects: ParaView files, history tables, pictures.

Everything is written collectively and atomically: data go to a temporary name first
(``.<name>.tmp<PID><suffix>``) and are renamed into place by rank 0 after all ranks
finished, so a run killed mid-write never leaves a half-written file under the final
name. Temporaries left by killed runs are removed by the next write of the same target
(:func:`remove_stale_temporaries`: only those whose PID is not a live process).

A write that fails on rank 0 (the target is a directory, the disk is full, ...) raises
the same ``OSError``, naming the path, on every rank (no rank waits forever).
"""

from nngf_fem.mpi import run_on_root

import csv
import io as _stdio
import json
import math
import os
import pathlib
import re
import shutil
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
from dolfinx import fem, io
from mpi4py import MPI

__all__ = ["write_history", "write_fields", "plot_history", "plot_fields", "gather_p1",
           "temporary_path", "remove_stale_temporaries"]


# ------------------------------------------------------------ temporaries
def temporary_path(path: str | os.PathLike, pid: int | None = None) -> pathlib.Path:
    """The temporary name a writer uses for ``path``: ``.<name>.tmp<PID><suffix>``.

    Args:
        path: the final file (or VTX folder).
        pid: the writing process's id (default: this process).
    """
    path = pathlib.Path(path)
    return path.with_name(f".{path.name}.tmp{os.getpid() if pid is None else pid}{path.suffix}")


def _pid_alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by somebody else
        return True
    except (OverflowError, ValueError, OSError):
        return False
    return True


def _remove(p: pathlib.Path) -> None:
    try:
        if p.is_dir() and not p.is_symlink():
            shutil.rmtree(p, ignore_errors=True)
        else:
            p.unlink(missing_ok=True)
    except OSError:
        pass


def remove_stale_temporaries(path: str | os.PathLike) -> list[pathlib.Path]:
    """Remove temporaries of ``path`` left behind by writers that were killed.

    Matches ``[.]<name>.tmp<PID>[.ext]`` and ``[.]<stem>.tmp<PID>[.ext]`` next to
    ``path`` (the names this package's writers use, including those of older versions)
    whose PID is not a live process on this machine. Not collective: call it on the
    writing rank only. Errors (an unreadable folder) are ignored.

    Args:
        path: the final file (or VTX folder) whose temporaries are cleaned.

    Returns:
        The removed paths.
    """
    path = pathlib.Path(path)
    names = "|".join(sorted({re.escape(path.name), re.escape(path.stem)}))
    pattern = re.compile(rf"^\.?(?:{names})\.tmp(\d+)(?:\..*)?$")
    removed: list[pathlib.Path] = []
    try:
        entries = list(os.scandir(path.parent))
    except OSError:
        return removed
    for entry in entries:
        m = pattern.match(entry.name)
        if m and not _pid_alive(int(m.group(1))):
            p = pathlib.Path(entry.path)
            _remove(p)
            removed.append(p)
    return removed


def _atomic_write(path: pathlib.Path, write: Callable[[pathlib.Path], None], what: str) -> None:
    """Run ``write(tmp)``, then rename ``tmp`` to ``path``.

    On any failure ``tmp`` is removed and an ``OSError`` naming ``path`` is raised (the
    final name never holds a half-written file).
    """
    tmp = temporary_path(path)
    try:
        if path.is_dir() and not path.is_symlink():
            raise IsADirectoryError(f"{path} is a directory")
        write(tmp)
        os.replace(tmp, path)
    except Exception as exc:
        _remove(tmp)
        raise OSError(f"cannot write {what} {path}: {type(exc).__name__}: {exc}") from exc


def _write_text_synced(tmp: pathlib.Path, text: str) -> None:
    with open(tmp, "w", newline="") as fh:
        fh.write(text)
        fh.flush()
        os.fsync(fh.fileno())


def _atomic_text(path: pathlib.Path, text: str, what: str = "file") -> None:
    _atomic_write(path, lambda tmp: _write_text_synced(tmp, text), what)


def _jsonable(v: Any) -> Any:
    if isinstance(v, float | np.floating):
        return float(v) if math.isfinite(v) else None
    if isinstance(v, np.integer):
        return int(v)
    if isinstance(v, np.ndarray):
        return [_jsonable(x) for x in v.tolist()]
    if isinstance(v, list | tuple):
        return [_jsonable(x) for x in v]
    if isinstance(v, dict):
        return {k: _jsonable(x) for k, x in v.items()}
    return v


def _save_png(fig, path: str | os.PathLike) -> None:
    """Save a matplotlib figure atomically (temporary name, then rename) and close it."""
    import matplotlib.pyplot as plt

    path = pathlib.Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        remove_stale_temporaries(path)
        _atomic_write(path, lambda tmp: fig.savefig(tmp, dpi=110, format="png"), "plot")
    finally:
        plt.close(fig)


def write_history(out_dir: str | os.PathLike, history: Sequence[dict], comm: MPI.Comm,
                  name: str = "history", meta: dict | None = None) -> None:
    """Write ``<name>.json`` (with ``meta``) and ``<name>.csv`` on rank 0, atomically.

    Collective. Stale temporaries of killed writers are removed first.

    Raises:
        OSError: on every rank if rank 0 cannot write a file (the message names it).
    """
    out = pathlib.Path(out_dir)

    def work() -> None:
        out.mkdir(parents=True, exist_ok=True)
        jpath, cpath = out / f"{name}.json", out / f"{name}.csv"
        for p in (jpath, cpath):
            remove_stale_temporaries(p)
        doc = {"meta": _jsonable(meta or {}), "history": _jsonable(list(history))}
        _atomic_text(jpath, json.dumps(doc, indent=1), "history")
        keys: list[str] = []
        for h in history:
            keys += [k for k in h if k not in keys and not isinstance(h[k], list | dict)]
        buf = _stdio.StringIO()
        w = csv.DictWriter(buf, fieldnames=keys, extrasaction="ignore")
        w.writeheader()
        for h in history:
            w.writerow({k: h.get(k, "") for k in keys})
        _atomic_text(cpath, buf.getvalue(), "history")

    run_on_root(comm, work, "")


def _is_vtx_folder(p: pathlib.Path) -> bool:
    """An ADIOS2 BP folder (or an empty folder) that may be replaced by a new one."""
    if not p.is_dir() or p.is_symlink():
        return False
    names = {q.name for q in p.iterdir()}
    return not names or bool(names & {"md.idx", "md.0", "mmd.0", "data.0", "profiling.json"})


def write_fields(path: str | os.PathLike, functions: Sequence[fem.Function],
                 engine: str = "vtx", time: float = 0.0) -> pathlib.Path:
    """Write Functions of one mesh for ParaView: VTX (``.bp`` folder) or XDMF (+ ``.h5``).

    VTX needs all functions on the same (Lagrange) space family/degree; XDMF
    interpolates nothing and writes each function on its mesh (P1/DG-friendly).
    Collective. Rank 0 first checks that the target can be written (its folder can be
    made and written to; an existing VTX target is a ``.bp`` folder, an XDMF target not
    a folder), so that ADIOS2/HDF5 are never started on a bad path; the data go to a
    temporary name that is renamed into place afterwards.

    Raises:
        ValueError: unknown engine or no functions.
        OSError: on every rank if the target cannot be written (the message names it).
    """
    if engine not in ("vtx", "xdmf"):
        raise ValueError(f"engine={engine!r} is not known; allowed: 'vtx', 'xdmf'")
    if not functions:
        raise ValueError("no functions to write")
    path = pathlib.Path(path)
    comm = functions[0].function_space.mesh.comm
    msh = functions[0].function_space.mesh
    tmp = temporary_path(path, comm.bcast(os.getpid(), root=0))
    h5, h5_tmp = path.with_suffix(".h5"), tmp.with_suffix(".h5")

    def precheck() -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        remove_stale_temporaries(path)
        _remove(tmp)  # ours (this PID): left by an earlier failed write of this process
        _remove(h5_tmp)
        if engine == "vtx":
            if path.exists() and not _is_vtx_folder(path):
                raise FileExistsError(f"{path} exists and is not a VTX (ADIOS2 .bp) folder; "
                                      "refusing to replace it")
            tmp.mkdir()  # probe: the folder is writable
            tmp.rmdir()
        else:
            remove_stale_temporaries(h5)
            for p in (path, h5):
                if p.is_dir():
                    raise IsADirectoryError(f"{p} is a directory")
            tmp.touch()
            tmp.unlink()

    run_on_root(comm, precheck, f"cannot write fields {path}")
    try:
        if engine == "vtx":
            with io.VTXWriter(comm, tmp, list(functions), engine="BP4") as w:
                w.write(time)
        else:
            with io.XDMFFile(comm, tmp, "w") as w:
                w.write_mesh(msh)
                for f in functions:
                    w.write_function(f, time)
    except Exception as exc:  # local: a failure inside ADIOS2/HDF5 cannot be synchronized
        raise OSError(f"cannot write fields {path}: {type(exc).__name__}: {exc}") from exc

    def finish() -> None:
        try:
            if engine == "vtx":
                old = path.with_name(tmp.name + ".old")
                if path.exists():
                    os.replace(path, old)
                os.replace(tmp, path)
                _remove(old)
            else:
                os.replace(h5_tmp, h5)
                text = tmp.read_text().replace(h5_tmp.name, h5.name)
                _atomic_text(path, text, "fields")  # rewrites tmp (same name), renames it
                tmp.unlink(missing_ok=True)
        except Exception:
            _remove(tmp)
            _remove(h5_tmp)
            raise

    comm.Barrier()
    run_on_root(comm, finish, f"cannot write fields {path}")
    return path


def gather_p1(f: fem.Function) -> tuple[np.ndarray, np.ndarray, np.ndarray] | None:
    """Gather a scalar field, interpolated to P1, on rank 0 for plotting.

    Returns ``(points (N, 2), triangles (M, 3), values (N,))`` on rank 0, None elsewhere.
    """
    msh = f.function_space.mesh
    comm = msh.comm
    V1 = fem.functionspace(msh, ("Lagrange", 1))
    f1 = fem.Function(V1)
    f1.interpolate(f)
    imap = V1.dofmap.index_map
    n = imap.size_local
    glob = imap.local_to_global(np.arange(imap.size_local + imap.num_ghosts, dtype=np.int32))
    pts = V1.tabulate_dof_coordinates()[:n, :2]
    vals = f1.x.array[:n]
    tdim = msh.topology.dim
    ncell = msh.topology.index_map(tdim).size_local
    cells = glob[V1.dofmap.list[:ncell]]
    data = comm.gather((glob[:n], pts, vals, cells), root=0)
    if comm.rank != 0:
        return None
    N = imap.size_global
    P, U = np.zeros((N, 2)), np.zeros(N)
    for g, p, v, _ in data:
        P[g], U[g] = p, v
    return P, np.vstack([c for *_, c in data]), U


def _plot_on_root(comm: MPI.Comm, path: str | os.PathLike, ncols: int,
                  size: tuple[float, float], draw) -> None:
    """A row of ``ncols`` panels drawn by ``draw(fig, axes)`` on rank 0, saved atomically.

    Collective: a failure raises ``OSError`` naming ``path`` on every rank (see
    :func:`~nngf_fem.mpi.run_on_root`).
    """
    def work() -> None:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, axes = plt.subplots(1, ncols, figsize=(size[0] * ncols, size[1]))
        try:
            draw(fig, np.atleast_1d(axes))
            fig.tight_layout()
        except BaseException:
            plt.close(fig)
            raise
        _save_png(fig, path)

    run_on_root(comm, work, f"cannot write plot {path}")


def plot_history(path: str | os.PathLike, history: Sequence[dict], comm: MPI.Comm,
                 extra: Sequence[str] = ()) -> None:
    """PNG with energy, alignment, network size (and ``extra`` columns) vs iteration.

    Expansions (history entries with a ``kind``) are marked by vertical lines.
    """
    steps = [h for h in history if h.get("kind") is None]
    exps = [h for h in history if h.get("kind") is not None]
    cols = [("energy", "energy", True), ("alignment", "alignment cos(alpha)", False),
            ("n_params", "parameters", False)] + [(c, c, True) for c in extra]

    def draw(fig, axes) -> None:
        it = [h["iteration"] for h in steps]
        for ax, (key, label, log) in zip(axes, cols, strict=True):
            y = [h.get(key, np.nan) for h in steps]
            ax.plot(it, y, "-", lw=1.5)
            if log and all((v or 0) > 0 for v in y if v == v):
                ax.set_yscale("log")
            for e in exps:
                ax.axvline(e["iteration"], color="tab:red", lw=0.8, ls="--")
            ax.set_xlabel("iteration")
            ax.set_title(label)
            ax.grid(alpha=0.3)

    _plot_on_root(comm, path, len(cols), (4.2, 3.4), draw)


def plot_fields(path: str | os.PathLike, fields: Sequence[tuple[str, fem.Function]],
                same_scale: bool = True) -> None:
    """PNG with scalar 2D fields side by side (e.g. true vs recovered coefficient)."""
    comm = fields[0][1].function_space.mesh.comm
    gathered = [(title, gather_p1(f)) for title, f in fields]

    def draw(fig, axes) -> None:
        from matplotlib.tri import Triangulation

        vmin = min(g[2].min() for _, g in gathered) if same_scale else None
        vmax = max(g[2].max() for _, g in gathered) if same_scale else None
        for ax, (title, (P, T, U)) in zip(axes, gathered, strict=True):
            tc = ax.tripcolor(Triangulation(P[:, 0], P[:, 1], T), U, shading="gouraud",
                              vmin=vmin, vmax=vmax, cmap="viridis")
            ax.set_aspect("equal")
            ax.set_title(title)
            fig.colorbar(tc, ax=ax, shrink=0.85)

    _plot_on_root(comm, path, len(fields), (4.3, 3.8), draw)
