"""Loading gmsh meshes with their physical markers, safely under MPI.

``dolfinx.io.gmsh.read_from_msh`` reads on one rank; a missing or corrupt file would
raise there while the other ranks wait in a collective. :func:`load_msh` checks the
file on the reading rank first and raises the same clear error on every rank.
"""

from nngf_fem.mpi import raise_on_any

import os
import pathlib

from dolfinx.io import gmsh as gmshio
from mpi4py import MPI

__all__ = ["load_msh"]


def _check_file(path: pathlib.Path, gdim: int) -> str:
    if not path.is_file():
        return f"mesh file {path} does not exist"
    try:
        import gmsh
    except ModuleNotFoundError:
        return "reading .msh files needs the gmsh Python module (pip install gmsh)"
    gmsh.initialize()
    try:
        gmsh.option.setNumber("General.Terminal", 0)
        gmsh.model.add("check")
        gmsh.merge(str(path))
        types, _, _ = gmsh.model.mesh.getElements(dim=gdim)
        if len(types) == 0:
            return f"mesh file {path} has no {gdim}D cells"
        if not gmsh.model.getPhysicalGroups(gdim):
            return f"mesh file {path} has no {gdim}D physical groups (cell markers)"
    except Exception as exc:  # noqa: BLE001 - gmsh raises generic exceptions
        return f"mesh file {path} cannot be read by gmsh: {exc}"
    finally:
        gmsh.finalize()
    return ""


def load_msh(path: str | os.PathLike, comm: MPI.Comm = MPI.COMM_WORLD, gdim: int = 2,
             rank: int = 0) -> gmshio.MeshData:
    """Read a gmsh ``.msh`` file into a distributed mesh with cell and facet tags.

    Returns ``dolfinx.io.gmsh.MeshData`` (``.mesh``, ``.cell_tags``, ``.facet_tags``, ...).

    Raises:
        ValueError: missing, unreadable or marker-less file (on all ranks).
    """
    path = pathlib.Path(path)
    err = _check_file(path, gdim) if comm.rank == rank else ""
    err = comm.bcast(err, root=rank)
    raise_on_any(comm, bool(err), err)
    return gmshio.read_from_msh(str(path), comm, rank=rank, gdim=gdim)
