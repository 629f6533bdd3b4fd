"""gmsh meshes in meshes/ load with their markers, serially and in parallel."""

import nngf_fem as nf

import pathlib

import numpy as np
import pytest
import ufl
from dolfinx import fem, mesh
from mpi4py import MPI

MESHES = pathlib.Path(__file__).resolve().parents[1] / "meshes"


@pytest.mark.parametrize("name,area,obs_area", [("square_inclusion.msh", 1.0, np.pi / 16),
                                                ("lshape.msh", 0.75, 0.25)])
def test_meshes_load_with_markers(name, area, obs_area):
    data = nf.meshes.load_msh(MESHES / name)
    msh = data.mesh
    dx = ufl.Measure("dx", domain=msh, subdomain_data=data.cell_tags)
    one = fem.Constant(msh, 1.0)
    total = msh.comm.allreduce(fem.assemble_scalar(fem.form(one * dx)))
    observed = msh.comm.allreduce(fem.assemble_scalar(fem.form(one * dx(2))))
    assert total == pytest.approx(area, rel=1e-10)
    assert observed == pytest.approx(obs_area, rel=2e-2)
    ds = ufl.Measure("ds", domain=msh, subdomain_data=data.facet_tags)
    perim = msh.comm.allreduce(fem.assemble_scalar(fem.form(one * ds(10))))
    assert perim > 2.0


def test_bad_mesh_files_raise_on_all_ranks(tempdir):
    with pytest.raises(ValueError, match="does not exist"):
        nf.meshes.load_msh(tempdir / "missing.msh")
    bad = tempdir / "corrupt.msh"
    if MPI.COMM_WORLD.rank == 0:
        bad.write_text("$MeshFormat\nthis is not a mesh\n")
    MPI.COMM_WORLD.Barrier()
    with pytest.raises(ValueError, match="corrupt.msh"):
        nf.meshes.load_msh(bad)


def collapse_first_row(msh, h):
    """Move the nodes of the second grid line onto the first: the first row of cells is flat."""
    x = msh.geometry.x
    x[x[:, 1] <= h + 1e-12, 1] = 0.0


def test_check_mesh_accepts_good_meshes():
    comm = MPI.COMM_WORLD
    nf.meshes.check_mesh(mesh.create_unit_square(comm, 4, 4))
    nf.meshes.check_mesh(mesh.create_unit_square(comm, 4, 4, mesh.CellType.quadrilateral))
    nf.meshes.check_mesh(mesh.create_unit_cube(comm, 2, 2, 2))
    nf.meshes.check_mesh(mesh.create_unit_cube(comm, 2, 2, 2, mesh.CellType.hexahedron))
    # strongly stretched but valid cells (aspect ratio 1e4) are not degenerate
    nf.meshes.check_mesh(mesh.create_rectangle(comm, [[0, 0], [1, 1e-4]], [4, 4]))


def test_check_mesh_nan_coordinates_on_one_rank():
    msh = mesh.create_unit_square(MPI.COMM_WORLD, 4, 4)
    if msh.comm.rank == 0:
        msh.geometry.x[0, 0] = np.nan
    with pytest.raises(ValueError, match=r"mesh coordinates contain NaN/Inf: 1 node\(s\)"):
        nf.meshes.check_mesh(msh)


@pytest.mark.parametrize("cell_type,count", [(mesh.CellType.triangle, 8),
                                             (mesh.CellType.quadrilateral, 4)])
def test_check_mesh_zero_area_cells(cell_type, count):
    msh = mesh.create_unit_square(MPI.COMM_WORLD, 4, 4, cell_type)
    collapse_first_row(msh, 0.25)
    with pytest.raises(ValueError, match=rf"mesh has {count} cell\(s\) of zero area .* "
                                         r"midpoint \(0\.\d+, 0\.0\)"):
        nf.meshes.check_mesh(msh)


def test_check_mesh_zero_volume_tetrahedra():
    msh = mesh.create_unit_cube(MPI.COMM_WORLD, 2, 2, 2)
    x = msh.geometry.x
    x[x[:, 2] <= 0.5 + 1e-12, 2] = 0.0  # the lower layer of cells is flat
    with pytest.raises(ValueError, match=r"mesh has 24 cell\(s\) of zero volume"):
        nf.meshes.check_mesh(msh)


def test_mixed_cell_types_file_is_refused(tempdir):
    path = tempdir / "mixed.msh"
    if MPI.COMM_WORLD.rank == 0:
        import gmsh

        gmsh.initialize()
        try:
            gmsh.option.setNumber("General.Terminal", 0)
            gmsh.model.add("mixed")
            gmsh.model.occ.addRectangle(0, 0, 0, 1, 1)
            gmsh.model.occ.addRectangle(1, 0, 0, 1, 1)
            gmsh.model.occ.removeAllDuplicates()
            gmsh.model.occ.synchronize()
            surfaces = [tag for _, tag in gmsh.model.getEntities(2)]
            gmsh.model.addPhysicalGroup(2, surfaces, 1)
            gmsh.model.mesh.setRecombine(2, surfaces[1])
            gmsh.option.setNumber("Mesh.MeshSizeMax", 0.5)
            gmsh.model.mesh.generate(2)
            gmsh.write(str(path))
        finally:
            gmsh.finalize()
    MPI.COMM_WORLD.Barrier()
    with pytest.raises(ValueError, match=r"mixed.msh mixes 2 cell types \(.*Quadrilateral.*"
                                         r"Triangle.*\); a DOLFINx mesh has one cell type"):
        nf.meshes.load_msh(path)


def test_check_tag_lists_the_available_tags():
    data = nf.meshes.load_msh(MESHES / "lshape.msh")
    assert nf.meshes.tag_values(data.cell_tags) == [1, 2]
    nf.meshes.check_tag(data.cell_tags, 2, "observe_tag")
    nf.meshes.check_tag(data.cell_tags, np.int32(1), "observe_tag")
    with pytest.raises(ValueError, match=r"observe_tag = 7 is not a cell tag of the mesh; "
                                         r"available cell tags: \[1, 2\]"):
        nf.meshes.check_tag(data.cell_tags, 7, "observe_tag")
    with pytest.raises(ValueError, match=r"boundary = 2 is not a facet tag .* \[10"):
        nf.meshes.check_tag(data.facet_tags, 2, "boundary")
    with pytest.raises(ValueError, match="the mesh has no tags"):
        nf.meshes.check_tag(None, 2, "observe_tag")
