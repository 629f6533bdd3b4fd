"""Shared helpers of the benchmark scripts: environment record, tables, atomic JSON.

Every benchmark prints a table on rank 0 and writes one JSON file with the
environment (versions, ranks, threads, machine), the arguments, the sizes and the
raw timings, so that a table in BENCHMARKS.md can be traced to the run behind it.
"""

import nngf_fem as nf  # noqa: I001  (load order of the pip DOLFINx wheel)

import datetime
import json
import math
import os
import pathlib
import platform
import statistics
import subprocess
from collections.abc import Iterable, Sequence
from typing import Any

import numpy as np
import torch
from mpi4py import MPI

RESULTS = pathlib.Path(__file__).resolve().parent / "results"


def git_state() -> dict[str, Any]:
    """Commit of the checkout and the tracked files that differ from it (None outside git)."""
    root = pathlib.Path(__file__).resolve().parents[1]

    def git(*cmd: str) -> str:
        return subprocess.run(["git", *cmd], cwd=root, capture_output=True, text=True,
                              timeout=10, check=True).stdout.strip()

    try:
        return {"commit": git("rev-parse", "HEAD"),
                "modified": git("diff", "--name-only", "HEAD").splitlines()}
    except (OSError, subprocess.SubprocessError):
        return {"commit": None, "modified": None}


#: git state when the benchmark started (rank 0; the JSON is written there)
GIT_AT_START = git_state() if MPI.COMM_WORLD.rank == 0 else None


def environment(comm: MPI.Comm = MPI.COMM_WORLD) -> dict[str, Any]:
    """Versions, machine and parallel layout of this run."""
    import dolfinx
    import petsc4py

    return {
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "python": platform.python_version(), "torch": torch.__version__,
        "dolfinx": dolfinx.__version__, "petsc4py": petsc4py.__version__,
        "numpy": np.__version__, "nngf_fem": nf.__version__,
        "machine": platform.machine(), "processor": platform.processor(),
        "cpus": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity")
        else os.cpu_count(),
        "ranks": comm.size, "torch_threads": torch.get_num_threads(),
        "dtype": "float64",
        # the code the numbers came from: commit plus uncommitted changes (by file), taken
        # when the script started (its modules were loaded then)
        "git": GIT_AT_START,
    }


def _clean(v: Any) -> Any:
    if isinstance(v, float | np.floating):
        return float(v) if math.isfinite(v) else None
    if isinstance(v, np.integer):
        return int(v)
    if isinstance(v, np.ndarray):
        return _clean(v.tolist())
    if isinstance(v, list | tuple):
        return [_clean(x) for x in v]
    if isinstance(v, dict):
        return {str(k): _clean(x) for k, x in v.items()}
    return v


def write_json(path: str | os.PathLike, payload: dict[str, Any],
               comm: MPI.Comm = MPI.COMM_WORLD) -> pathlib.Path:
    """Write ``payload`` (plus ``env``) as JSON on rank 0, atomically (temp name + rename)."""
    path = pathlib.Path(path)
    if comm.rank == 0:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
        tmp.write_text(json.dumps(_clean({"env": environment(comm), **payload}), indent=1))
        os.replace(tmp, path)
    comm.Barrier()
    return path


def choices(text: str, allowed: Iterable[str], what: str = "method") -> list[str]:
    """The comma-separated names of ``text``, each checked against ``allowed``.

    Raises:
        ValueError: a name is not allowed (the message names it and the allowed ones).
    """
    allowed = list(allowed)
    names = text.split(",")
    for name in names:
        if name not in allowed:
            raise ValueError(f"{what} {name!r} is not known; allowed: {allowed}")
    return names


def median(values: Sequence[float]) -> float:
    """Median of finite values (NaN when there are none)."""
    vals = [float(v) for v in values if v is not None and math.isfinite(v)]
    return statistics.median(vals) if vals else math.nan


def frozen_from(errors: Sequence[float], min_run: int = 10) -> int | None:
    """First iteration from which the error never changes again (>= min_run steps), or None."""
    k = len(errors) - 1
    while k > 0 and errors[k - 1] == errors[-1]:
        k -= 1
    return k if len(errors) - 1 - k >= min_run else None


def first_reach(errors: Sequence[float], times: Sequence[float], thr: float):
    """Iteration and time at which the error first is <= thr (None, None if never)."""
    k = next((i for i, e in enumerate(errors) if e <= thr), None)
    return (None, None) if k is None else (k, times[k])


def fmt(v: Any, spec: str = ".3g") -> str:
    """Format a table cell (``-`` for missing values)."""
    if v is None or (isinstance(v, float) and not math.isfinite(v)):
        return "-"
    if isinstance(v, int | np.integer):
        return f"{int(v):,}"
    if isinstance(v, float | np.floating):
        return f"{float(v):,.0f}" if abs(v) >= 1000 else format(float(v), spec)
    return str(v)


def print_table(title: str, columns: Sequence[tuple[str, str]], rows: Sequence[dict],
                comm: MPI.Comm = MPI.COMM_WORLD) -> str:
    """Print (rank 0) and return a Markdown table; ``columns`` are ``(key, header)``."""
    head = "| " + " | ".join(h for _, h in columns) + " |"
    sep = "|" + "|".join("---" if i == 0 else "---:" for i in range(len(columns))) + "|"
    body = ["| " + " | ".join(fmt(r.get(k)) for k, _ in columns) + " |" for r in rows]
    text = "\n".join([title, "", head, sep, *body])
    if comm.rank == 0:
        print(text, flush=True)
    return text


def save_plot(fig, path: str | os.PathLike) -> None:
    """Save a matplotlib figure atomically (rank 0 calls this)."""
    from nngf_fem.io import _save_png

    _save_png(fig, path)


def smooth_truth(x):
    """The coefficient every inversion benchmark recovers (as the flagship demo).

    ``exp(0.5 sin(2 pi x) sin(pi y) - 0.4 exp(-|x - (0.3, 0.7)|^2 / 0.02))`` for a UFL
    ``SpatialCoordinate`` ``x``: a smooth bump and a localized dip.
    """
    import ufl

    return ufl.exp(0.5 * ufl.sin(2 * ufl.pi * x[0]) * ufl.sin(ufl.pi * x[1])
                   - 0.4 * ufl.exp(-((x[0] - 0.3) ** 2 + (x[1] - 0.7) ** 2) / 0.02))


def zero_boundary_condition(V):
    """``y = 0`` on the whole boundary of ``V``'s (2D) mesh."""
    from dolfinx import fem, mesh

    msh = V.mesh
    msh.topology.create_connectivity(1, 2)
    facets = mesh.exterior_facet_indices(msh.topology)
    return fem.dirichletbc(0.0, fem.locate_dofs_topological(V, 1, facets), V)


def flow_summary(flow, result) -> dict:
    """Diagnostics of a natural-gradient run for the JSON.

    Growth, rejections, damping, CG products, alignment, and the seconds spent inside
    the steps by part.
    """
    steps = [h for h in flow.history if h.get("kind") is None]
    return {"reason": result.reason, "curvature": flow.curvature,
            "expansions": len(flow.expansions),
            "expansion_iterations": [e["iteration"] for e in flow.expansions],
            "rejected_steps": sum(not h["accepted"] for h in steps),
            "lambda": [h.get("lambda") for h in steps],
            "cg_its": [h.get("cg_its") for h in steps],
            "alignment": [h.get("alignment") for h in steps],
            # seconds inside the flow's steps by part (expansions are outside steps)
            "time_split": {key: sum(h.get(key, 0.0) for h in steps)
                           for key in ("t_total", "t_pde", "t_riesz", "t_ng", "t_sketch",
                                       "t_network")}}
