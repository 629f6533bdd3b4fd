"""Checkpoint and resume a flow: architecture, weights, flow state, history, expansions.

Files are written by rank 0 to a temporary name and renamed into place
(``os.replace`` is atomic), then all ranks synchronize, so a run killed at any
moment leaves either the previous or the new checkpoint, never a half-written one.
The whole ``torch.nn.Module`` is stored, so a network grown by expansion is rebuilt
with its current architecture.
"""

from nngf_fem.mpi import raise_on_any

import os
import pathlib
from typing import Any

import torch

__all__ = ["save_checkpoint", "load_checkpoint"]

_FORMAT = 1


def _flow_extra(flow) -> dict[str, Any]:
    return {"expansions": list(getattr(flow, "expansions", [])),
            "last_expansion": getattr(flow, "last_expansion", -1)}


def save_checkpoint(path: str | os.PathLike, flow) -> None:
    """Write the flow's state to ``path`` (collective; rank 0 writes atomically).

    Args:
        path: checkpoint file (e.g. ``out/checkpoint.pt``).
        flow: a :class:`~nngf_fem.flow.NaturalGradientFlow` (or baseline with
            ``state_dict``) whose ``field.module`` is saved with it.
    """
    comm = flow.field.comm
    path = pathlib.Path(path)
    err = ""
    if comm.rank == 0:
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_name(path.name + f".tmp{os.getpid()}")
            torch.save({"format": _FORMAT, "module": flow.field.module,
                        "flow": flow.state_dict(), "extra": _flow_extra(flow)}, tmp)
            os.replace(tmp, path)
        except OSError as exc:
            err = f"cannot write checkpoint {path}: {exc}"
    raise_on_any(comm, bool(err), err, OSError)


def load_checkpoint(path: str | os.PathLike, flow) -> dict[str, Any]:
    """Restore a checkpoint written by :func:`save_checkpoint` into ``flow`` (collective).

    The field's module is replaced by the stored one (same class, possibly grown).

    Raises:
        FileNotFoundError: no checkpoint at ``path`` (on all ranks).
        ValueError: the file is not a readable nngf_fem checkpoint (on all ranks).
    """
    comm = flow.field.comm
    path = pathlib.Path(path)
    raise_on_any(comm, not path.is_file(), f"no checkpoint at {path}", FileNotFoundError)
    data, err = None, ""
    try:
        data = torch.load(path, weights_only=False)
        if not isinstance(data, dict) or data.get("format") != _FORMAT:
            err = f"{path} is not an nngf_fem checkpoint (format {_FORMAT})"
    except Exception as exc:  # noqa: BLE001 - corrupt files raise many types
        err = f"cannot read checkpoint {path}: {exc}"
    raise_on_any(comm, bool(err), err, ValueError)
    flow.field.module = data["module"]
    flow.load_state_dict(data["flow"])
    flow.expansions = list(data["extra"]["expansions"])
    flow.last_expansion = data["extra"]["last_expansion"]
    return data
