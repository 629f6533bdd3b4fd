"""gmsh meshes in meshes/ load with their markers, serially and in parallel."""

import nngf_fem as nf

import pathlib

import numpy as np
import pytest
import ufl
from dolfinx import fem
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
