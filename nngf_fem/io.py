"""Outputs a FEniCSx user expects: ParaView files, history tables, pictures.

Everything is written collectively and atomically: data go to a temporary name first
and are renamed into place by rank 0 after all ranks finished, so a run killed
mid-write never leaves a half-written file under the final name.
"""

import csv
import json
import math
import os
import pathlib
import shutil
from collections.abc import Sequence
from typing import Any

import numpy as np
from dolfinx import fem, io
from mpi4py import MPI

__all__ = ["write_history", "write_fields", "plot_history", "plot_fields", "gather_p1"]


def _atomic_text(path: pathlib.Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    tmp.write_text(text)
    os.replace(tmp, path)


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
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.stem}.tmp{os.getpid()}.png")
    fig.savefig(tmp, dpi=110)
    plt.close(fig)
    os.replace(tmp, path)


def write_history(out_dir: str | os.PathLike, history: Sequence[dict], comm: MPI.Comm,
                  name: str = "history", meta: dict | None = None) -> None:
    """Write ``<name>.json`` (with ``meta``) and ``<name>.csv`` on rank 0, atomically."""
    if comm.rank == 0:
        out = pathlib.Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        doc = {"meta": _jsonable(meta or {}), "history": _jsonable(list(history))}
        _atomic_text(out / f"{name}.json", json.dumps(doc, indent=1))
        keys: list[str] = []
        for h in history:
            keys += [k for k in h if k not in keys and not isinstance(h[k], list | dict)]
        tmp = out / f".{name}.csv.tmp{os.getpid()}"
        with tmp.open("w", newline="") as fh:
            w = csv.DictWriter(fh, fieldnames=keys, extrasaction="ignore")
            w.writeheader()
            for h in history:
                w.writerow({k: h.get(k, "") for k in keys})
        os.replace(tmp, out / f"{name}.csv")
    comm.Barrier()


def write_fields(path: str | os.PathLike, functions: Sequence[fem.Function],
                 engine: str = "vtx", time: float = 0.0) -> pathlib.Path:
    """Write Functions of one mesh for ParaView: VTX (``.bp`` folder) or XDMF (+ ``.h5``).

    VTX needs all functions on the same (Lagrange) space family/degree; XDMF
    interpolates nothing and writes each function on its mesh (P1/DG-friendly).
    """
    if engine not in ("vtx", "xdmf"):
        raise ValueError(f"engine={engine!r} is not known; allowed: 'vtx', 'xdmf'")
    if not functions:
        raise ValueError("no functions to write")
    path = pathlib.Path(path)
    comm = functions[0].function_space.mesh.comm
    msh = functions[0].function_space.mesh
    tmp = path.with_name(f".{path.stem}.tmp{comm.bcast(os.getpid(), root=0)}{path.suffix}")
    if comm.rank == 0:
        path.parent.mkdir(parents=True, exist_ok=True)
    comm.Barrier()
    if engine == "vtx":
        with io.VTXWriter(comm, tmp, list(functions), engine="BP4") as w:
            w.write(time)
    else:
        with io.XDMFFile(comm, tmp, "w") as w:
            w.write_mesh(msh)
            for f in functions:
                w.write_function(f, time)
    comm.Barrier()
    if comm.rank == 0:
        if engine == "vtx":
            if path.exists():
                shutil.rmtree(path)
            os.replace(tmp, path)
        else:
            h5_tmp, h5 = tmp.with_suffix(".h5"), path.with_suffix(".h5")
            os.replace(h5_tmp, h5)
            text = tmp.read_text().replace(h5_tmp.name, h5.name)
            _atomic_text(path, text)
            tmp.unlink()
    comm.Barrier()
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


def plot_history(path: str | os.PathLike, history: Sequence[dict], comm: MPI.Comm,
                 extra: Sequence[str] = ()) -> None:
    """PNG with energy, alignment, network size (and ``extra`` columns) vs iteration.

    Expansions (history entries with a ``kind``) are marked by vertical lines.
    """
    if comm.rank != 0:
        comm.Barrier()
        return
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps = [h for h in history if h.get("kind") is None]
    exps = [h for h in history if h.get("kind") is not None]
    cols = [("energy", "energy", True), ("alignment", "alignment cos(alpha)", False),
            ("n_params", "parameters", False)] + [(c, c, True) for c in extra]
    fig, axes = plt.subplots(1, len(cols), figsize=(4.2 * len(cols), 3.4))
    it = [h["iteration"] for h in steps]
    for ax, (key, label, log) in zip(np.atleast_1d(axes), cols, strict=True):
        y = [h.get(key, np.nan) for h in steps]
        ax.plot(it, y, "-", lw=1.5)
        if log and all((v or 0) > 0 for v in y if v == v):
            ax.set_yscale("log")
        for e in exps:
            ax.axvline(e["iteration"], color="tab:red", lw=0.8, ls="--")
        ax.set_xlabel("iteration")
        ax.set_title(label)
        ax.grid(alpha=0.3)
    fig.tight_layout()
    _save_png(fig, path)
    comm.Barrier()


def plot_fields(path: str | os.PathLike, fields: Sequence[tuple[str, fem.Function]],
                same_scale: bool = True) -> None:
    """PNG with scalar 2D fields side by side (e.g. true vs recovered coefficient)."""
    comm = fields[0][1].function_space.mesh.comm
    gathered = [(title, gather_p1(f)) for title, f in fields]
    if comm.rank == 0:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        from matplotlib.tri import Triangulation

        vmin = min(g[2].min() for _, g in gathered) if same_scale else None
        vmax = max(g[2].max() for _, g in gathered) if same_scale else None
        fig, axes = plt.subplots(1, len(gathered), figsize=(4.3 * len(gathered), 3.8))
        for ax, (title, (P, T, U)) in zip(np.atleast_1d(axes), gathered, strict=True):
            tc = ax.tripcolor(Triangulation(P[:, 0], P[:, 1], T), U, shading="gouraud",
                              vmin=vmin, vmax=vmax, cmap="viridis")
            ax.set_aspect("equal")
            ax.set_title(title)
            fig.colorbar(tc, ax=ax, shrink=0.85)
        fig.tight_layout()
        _save_png(fig, path)
    comm.Barrier()
