"""Checkpoint and resume a flow: architecture, weights, flow state, history, expansions.

Files are written by rank 0 to a temporary name and renamed into place
(``os.replace`` is atomic), then all ranks synchronize, so a run killed at any
moment leaves either the previous or the new checkpoint, never a half-written one;
temporaries left by killed runs are removed by the next save or load. A failed write
(the path is a directory, the disk is full) raises the same ``OSError`` on all ranks.
The whole ``torch.nn.Module`` is stored, so a network grown by expansion is rebuilt
with its current architecture.

**Provenance.** A checkpoint records what it belongs to: the parameter shapes of the
network when the flow was created (``flow.initial_shapes``), the global number of mesh
cells and of field rows, the energy class, the field's transform and representation,
and ``flow.checkpoint_meta`` (a dict the caller fills, e.g. a demo's name and the
arguments that define the problem). :func:`load_checkpoint` refuses a checkpoint whose
record differs from the current flow's with a ``ValueError`` naming the item. The
energy's counters (forward/adjoint PDE solves ...) are saved and restored, so counts
continue after a resume. Rank 0 reads the file and broadcasts it: all ranks get the
same parameters by construction.
"""

from nngf_fem.io import remove_stale_temporaries, temporary_path
from nngf_fem.mpi import raise_on_any, run_on_root

import os
import pathlib
import pickle
from typing import Any

import numpy as np
import torch

__all__ = ["save_checkpoint", "load_checkpoint", "checkpoint_provenance"]

#: 2: provenance and energy counters (format 1 files are refused with a clear message)
_FORMAT = 2


def _flow_extra(flow) -> dict[str, Any]:
    return {"expansions": list(getattr(flow, "expansions", [])),
            "last_expansion": getattr(flow, "last_expansion", -1)}


def _plain(v: Any) -> Any:
    """Numbers, strings, lists and dicts only (comparable, printable)."""
    if isinstance(v, np.ndarray):
        return _plain(v.tolist())
    if isinstance(v, np.generic):
        return v.item()
    if isinstance(v, list | tuple):
        return [_plain(x) for x in v]
    if isinstance(v, dict):
        return {str(k): _plain(x) for k, x in v.items()}
    if isinstance(v, pathlib.PurePath):
        return str(v)
    return v


def checkpoint_provenance(flow) -> dict[str, Any]:
    """What a checkpoint of ``flow`` belongs to (collective: counts global rows).

    Returns:
        A dict with ``parameter shapes`` (at the flow's creation), ``mesh cells``,
        ``field rows`` (global), ``energy`` (class name), ``transform``,
        ``representation``, ``curvature`` (of a natural-gradient flow; its state cannot
        be restored into a flow of another kind) and ``checkpoint_meta``.
    """
    field = flow.field
    comm = field.comm
    shapes = getattr(flow, "initial_shapes", None)
    if shapes is None:  # flows without the attribute (baselines): current shapes
        shapes = [tuple(p.shape) for p in getattr(field, "parameters", [])]
    msh = getattr(field, "mesh", None)
    cells = None
    if msh is not None:
        cells = int(msh.topology.index_map(msh.topology.dim).size_global)
    rows = getattr(field, "local_size", None)
    rows = None if rows is None else int(comm.allreduce(int(rows)))
    transform = getattr(field, "transform_name", None)
    if transform is None and getattr(field, "samples", None):
        transform = getattr(field.samples[0], "transform_name", None)
    return {"parameter shapes": [[int(n) for n in s] for s in shapes],
            "mesh cells": cells,
            "field rows": rows,
            "energy": type(flow.energy).__name__ if hasattr(flow, "energy") else None,
            "transform": transform,
            "representation": getattr(field, "representation", None),
            "curvature": getattr(flow, "curvature", None),
            "checkpoint_meta": _plain(dict(getattr(flow, "checkpoint_meta", None) or {}))}


def _difference(old: Any, new: Any, name: str) -> str | None:
    """The first differing item of two provenance records, described, or None."""
    if isinstance(old, dict) and isinstance(new, dict):
        for k in list(old) + [k for k in new if k not in old]:
            if k not in new:
                return f"{name}[{k!r}]: {old[k]!r} in the checkpoint, missing in this run"
            if k not in old:
                return f"{name}[{k!r}]: missing in the checkpoint, {new[k]!r} in this run"
            d = _difference(old[k], new[k], f"{name}[{k!r}]" if name else str(k))
            if d:
                return d
        return None
    if old != new:
        return f"{name}: {old!r} in the checkpoint vs {new!r} in this run"
    return None


def save_checkpoint(path: str | os.PathLike, flow) -> None:
    """Write the flow's state to ``path`` (collective; rank 0 writes atomically).

    Args:
        path: checkpoint file (e.g. ``out/checkpoint.pt``).
        flow: a :class:`~nngf_fem.flow.NaturalGradientFlow` (or baseline with
            ``state_dict``) whose ``field.module`` is saved with it.

    Raises:
        OSError: on every rank if rank 0 cannot write the file (any error, e.g. a
            full disk reported by torch as ``RuntimeError``); the message names ``path``.
    """
    comm = flow.field.comm
    path = pathlib.Path(path)
    provenance = checkpoint_provenance(flow)
    state = flow.state_dict()
    counters = dict(getattr(getattr(flow, "energy", None), "counters", None) or {})

    def work() -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        remove_stale_temporaries(path)
        if path.is_dir():
            raise IsADirectoryError(f"{path} is a directory")
        tmp = temporary_path(path)
        try:
            with open(tmp, "wb") as fh:
                torch.save({"format": _FORMAT, "module": flow.field.module, "flow": state,
                            "extra": _flow_extra(flow), "provenance": provenance,
                            "counters": counters}, fh)
                fh.flush()
                os.fsync(fh.fileno())
            os.replace(tmp, path)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise

    run_on_root(comm, work, f"cannot write checkpoint {path}")


def load_checkpoint(path: str | os.PathLike, flow) -> dict[str, Any]:
    """Restore a checkpoint written by :func:`save_checkpoint` into ``flow`` (collective).

    Rank 0 reads the file and broadcasts it. The stored provenance must match the
    current flow's (see the module docstring); then the field's module is replaced by
    the stored one (same class, possibly grown), and the flow state, expansion records
    and energy counters are restored.

    Raises:
        FileNotFoundError: no checkpoint at ``path`` (on all ranks).
        ValueError: the file is not a readable nngf_fem checkpoint of this format, or it
            belongs to another run (the message names the differing item); on all ranks.
    """
    comm = flow.field.comm
    path = pathlib.Path(path)
    missing = False
    if comm.rank == 0:
        remove_stale_temporaries(path)
        missing = not path.is_file()
    raise_on_any(comm, missing, f"no checkpoint at {path}", FileNotFoundError)
    blob, err = None, ""
    if comm.rank == 0:
        try:
            data = torch.load(path, weights_only=False)
            if not isinstance(data, dict) or "format" not in data:
                err = f"{path} is not an nngf_fem checkpoint"
            elif data["format"] != _FORMAT:
                err = (f"{path} is an nngf_fem checkpoint of format {data['format']!r}; this "
                       f"version reads format {_FORMAT} (checkpoints that record which run "
                       "they belong to): start without resuming, or remove the file")
            else:
                blob = pickle.dumps(data, protocol=pickle.HIGHEST_PROTOCOL)
        except Exception as exc:  # noqa: BLE001 - corrupt files raise many types
            err = f"cannot read checkpoint {path}: {type(exc).__name__}: {exc}"
    raise_on_any(comm, bool(err), err, ValueError)
    blob = comm.bcast(blob, root=0)
    data, err = None, ""
    try:
        data = pickle.loads(blob)  # noqa: S301 - our own bytes, just broadcast
    except Exception as exc:  # noqa: BLE001
        err = f"cannot read checkpoint {path}: {type(exc).__name__}: {exc}"
    raise_on_any(comm, bool(err), err, ValueError)
    diff = _difference(data.get("provenance", {}), checkpoint_provenance(flow), "")
    raise_on_any(comm, diff is not None,
                 f"checkpoint {path} belongs to another run ({diff}); start without "
                 "resuming, or use another output folder", ValueError)
    flow.field.module = data["module"]
    flow.load_state_dict(data["flow"])
    flow.expansions = list(data["extra"]["expansions"])
    flow.last_expansion = data["extra"]["last_expansion"]
    counters = getattr(getattr(flow, "energy", None), "counters", None)
    if isinstance(counters, dict):
        counters.update(data.get("counters", {}))
    return data
