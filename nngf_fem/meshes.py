"""Loading gmsh meshes with their physical markers, and mesh sanity checks, safely under MPI.

``dolfinx.io.gmsh.read_from_msh`` reads on one rank; a missing or corrupt file would
raise there while the other ranks wait in a collective. :func:`load_msh` checks the
file on the reading rank first and raises the same clear error on every rank: also for
a file with several cell types (triangles and quadrilaterals: a DOLFINx mesh has one).

:func:`check_mesh` (collective) refuses meshes that would make everything downstream
fail in obscure ways: NaN/Inf coordinates (otherwise reported later as a non-finite
network output) and cells of zero area/volume (otherwise singular systems).
:func:`load_msh` calls it; call it on meshes of your own.
"""

from nngf_fem.mpi import raise_on_any

import math
import os
import pathlib

import numpy as np
from dolfinx import mesh as dmesh
from dolfinx.io import gmsh as gmshio
from mpi4py import MPI

__all__ = ["check_mesh", "check_tag", "load_msh", "tag_values"]

#: vertex index tuples splitting a cell into simplices (DOLFINx vertex numbering)
_SIMPLICES = {
    "interval": [(0, 1)],
    "triangle": [(0, 1, 2)],
    "tetrahedron": [(0, 1, 2, 3)],
    "quadrilateral": [(0, 1, 3), (0, 3, 2)],
    "hexahedron": [(0, 1, 3, 7), (0, 1, 5, 7), (0, 2, 3, 7), (0, 2, 6, 7), (0, 4, 5, 7),
                   (0, 4, 6, 7)],
}
_MEASURE = {1: "length", 2: "area", 3: "volume"}


def _cell_measures(msh: dmesh.Mesh, cells: np.ndarray) -> tuple[np.ndarray, np.ndarray,
                                                                   np.ndarray] | None:
    """Measures (from the cells' vertices), diameters and midpoints of ``cells``.

    None for cell types without a simplex split (prisms, pyramids).
    """
    name = msh.topology.cell_name()
    if name not in _SIMPLICES:
        return None
    tdim = msh.topology.dim
    nverts = {"interval": 2, "triangle": 3, "tetrahedron": 4, "quadrilateral": 4,
              "hexahedron": 8}[name]
    nodes = msh.geometry.dofmaps[0][cells][:, :nverts]  # vertex nodes come first
    X = msh.geometry.x[nodes]  # (cells, nverts, 3)
    measure = np.zeros(len(cells))
    for simplex in _SIMPLICES[name]:
        E = X[:, simplex[1:], :] - X[:, simplex[:1], :]  # (cells, tdim, 3)
        gram = np.einsum("cik,cjk->cij", E, E)
        measure += np.sqrt(np.abs(np.linalg.det(gram))) / math.factorial(tdim)
    diffs = X[:, :, None, :] - X[:, None, :, :]
    diameter = np.sqrt(np.max(np.sum(diffs**2, axis=-1), axis=(1, 2)))
    return measure, diameter, X.mean(axis=1)


def check_mesh(msh: dmesh.Mesh, rtol: float = 1e-10, *, source: str | None = None) -> None:
    """Check a mesh for NaN/Inf coordinates and degenerate cells (collective).

    A cell is degenerate when its area (volume, length) is at most
    ``rtol * diameter**tdim`` -- coincident or collinear vertices. Curved cells are
    judged by their vertices; prisms and pyramids are not checked for degeneracy.

    Args:
        msh: the mesh (all ranks).
        rtol: relative threshold of a degenerate cell's measure.
        source: where the mesh comes from, put in front of messages (e.g. the file).

    Raises:
        ValueError: on all ranks, naming the number of bad nodes or cells and an
            example (a node's coordinates, a cell's midpoint).
    """
    comm = msh.comm
    head = f"{source}: " if source else ""
    x = msh.geometry.x
    bad_nodes = ~np.all(np.isfinite(x), axis=1)  # owned and ghost nodes
    n_owned_nodes = msh.geometry.index_map().size_local
    counts = comm.allreduce(np.array([np.count_nonzero(bad_nodes[:n_owned_nodes]),
                                      np.count_nonzero(bad_nodes)]))
    if counts[1]:
        local = x[bad_nodes][0][:msh.geometry.dim].tolist() if bad_nodes.any() else None
        example = next(e for e in comm.allgather(local) if e is not None)
        raise_on_any(comm, True, f"{head}mesh coordinates contain NaN/Inf: {max(counts[0], 1)} "
                     f"node(s), e.g. {example}; check the mesh file or the code that moved "
                     "the nodes")
    tdim = msh.topology.dim
    n_owned = msh.topology.index_map(tdim).size_local
    geo = _cell_measures(msh, np.arange(n_owned, dtype=np.int32))
    found = 0
    local = None
    if geo is not None:
        measure, diameter, mid = geo
        degenerate = ~(measure > rtol * diameter**tdim)
        found = int(np.count_nonzero(degenerate))
        if found:
            local = [round(float(c), 12) for c in mid[np.argmax(degenerate)][:msh.geometry.dim]]
    total = comm.allreduce(found)
    if total:
        example = next(e for e in comm.allgather(local) if e is not None)
        what = _MEASURE.get(tdim, "measure")
        raise_on_any(comm, True, f"{head}mesh has {total} cell(s) of zero {what} ({what} <= "
                     f"{rtol:g} x diameter^{tdim}: coincident or collinear vertices), e.g. "
                     f"the cell with midpoint {tuple(example)}")


def tag_values(tags: dmesh.MeshTags) -> list[int]:
    """The distinct values of mesh tags over all ranks, sorted (collective)."""
    local = np.unique(np.asarray(tags.values)).tolist()
    return sorted({int(v) for part in tags.topology.comm.allgather(local) for v in part})


def check_tag(tags: dmesh.MeshTags | None, tag: int, name: str = "tag",
              comm: MPI.Comm | None = None) -> None:
    """Raise a clear error if ``tag`` is not a value of ``tags`` (collective).

    A measure ``dx(tag)`` with a tag that marks no cell integrates over nothing: a
    misfit on it is 0 and its normalization divides by 0.

    Args:
        tags: cell (or facet) tags, e.g. ``load_msh(...).cell_tags``; None: the mesh has
            no tags (an error).
        tag: the tag value asked for.
        name: how the caller calls the tag (e.g. ``"--observe-tag"``), for the message.
        comm: communicator (default: the tags' mesh communicator; needed if ``tags`` is None).

    Raises:
        ValueError: on all ranks, listing the available tag values.
    """
    if tags is None:
        raise ValueError(f"{name} = {tag!r}: the mesh has no tags (use a gmsh mesh with "
                         "physical groups)")
    comm = comm or tags.topology.comm
    available = tag_values(tags)
    dim = tags.dim
    kind = {tags.topology.dim: "cell", tags.topology.dim - 1: "facet"}.get(dim, f"dim-{dim}")
    raise_on_any(comm, tag not in available,
                 f"{name} = {tag!r} is not a {kind} tag of the mesh; available {kind} tags: "
                 f"{available}")


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
        groups = gmsh.model.getPhysicalGroups(gdim)
        if not groups:
            return f"mesh file {path} has no {gdim}D physical groups (cell markers)"
        marked: set[int] = set()  # element types of the cells DOLFINx reads
        for dim, tag in groups:
            for entity in gmsh.model.getEntitiesForPhysicalGroup(dim, tag):
                marked.update(int(t) for t in gmsh.model.mesh.getElements(dim, entity)[0])
        if len(marked) > 1:
            names = sorted(gmsh.model.mesh.getElementProperties(t)[0] for t in marked)
            return (f"mesh file {path} mixes {len(marked)} cell types ({', '.join(names)}); "
                    "a DOLFINx mesh has one cell type: mesh all surfaces with triangles, or "
                    "recombine all of them into quadrilaterals")
    except Exception as exc:  # noqa: BLE001 - gmsh raises generic exceptions
        return f"mesh file {path} cannot be read by gmsh: {exc}"
    finally:
        gmsh.finalize()
    return ""


def load_msh(path: str | os.PathLike, comm: MPI.Comm = MPI.COMM_WORLD, gdim: int = 2,
             rank: int = 0) -> gmshio.MeshData:
    """Read a gmsh ``.msh`` file into a distributed mesh with cell and facet tags.

    The mesh is checked by :func:`check_mesh` (NaN/Inf coordinates, degenerate cells).

    Returns ``dolfinx.io.gmsh.MeshData`` (``.mesh``, ``.cell_tags``, ``.facet_tags``, ...).

    Raises:
        ValueError: missing, unreadable or marker-less file, several cell types, bad
            coordinates or degenerate cells (on all ranks; the message names the file).
    """
    path = pathlib.Path(path)
    err = _check_file(path, gdim) if comm.rank == rank else ""
    err = comm.bcast(err, root=rank)
    raise_on_any(comm, bool(err), err)
    data = gmshio.read_from_msh(str(path), comm, rank=rank, gdim=gdim)
    check_mesh(data.mesh, source=f"mesh file {path}")
    return data
