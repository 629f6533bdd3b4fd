"""Outputs: history tables, ParaView files, plots -- collective and atomic."""

import nngf_fem as nf
from nngf_fem import io as nio

import json

import numpy as np
import pytest
import torch
import ufl
from dolfinx import fem, mesh
from mpi4py import MPI


@pytest.fixture
def run():
    msh = mesh.create_unit_square(MPI.COMM_WORLD, 6, 6)
    torch.manual_seed(0)
    u = nf.NeuralField(msh, nf.MLP(2, width=3, depth=1), name="u")
    x = ufl.SpatialCoordinate(msh)
    energy = nf.RegressionEnergy(u, ufl.sin(3 * x[0]) * x[1], norm="H1")
    flow = nf.NaturalGradientFlow(energy, nf.H1(u))
    nf.run_expansive(flow, nf.ExpansionPolicy(threshold=0.99, patience=1, n_candidates=32), 3)
    return u, flow


def test_history_json_and_csv(run, tempdir):
    u, flow = run
    nio.write_history(tempdir, flow.history, MPI.COMM_WORLD, meta={"demo": "test"})
    data = json.loads((tempdir / "history.json").read_text())
    assert data["meta"]["demo"] == "test"
    assert len(data["history"]) == len(flow.history)
    rows = (tempdir / "history.csv").read_text().splitlines()
    assert rows[0].startswith("iteration") and len(rows) == len(flow.history) + 1
    assert not list(tempdir.glob(".*tmp*"))


@pytest.mark.parametrize("engine", ["vtx", "xdmf"])
def test_fields_written_for_paraview(run, tempdir, engine):
    u, _ = run
    suffix = ".bp" if engine == "vtx" else ".xdmf"
    p = nio.write_fields(tempdir / f"u{suffix}", [u.function], engine=engine)
    assert p.exists()
    if engine == "xdmf":
        assert p.with_suffix(".h5").exists()
        assert "u.h5" in p.read_text()
    assert not list(tempdir.glob(".*tmp*"))
    with pytest.raises(ValueError, match="engine"):
        nio.write_fields(tempdir / "u.vtu", [u.function], engine="vtk")


def test_gather_and_plots(run, tempdir):
    u, flow = run
    g = nio.gather_p1(u.function)
    if MPI.COMM_WORLD.rank == 0:
        P, T, U = g
        assert P.shape == (49, 2) and T.shape == (72, 3)
        with torch.no_grad():
            ref = u.evaluate(u.param_dict(), torch.from_numpy(P)).numpy()[:, 0]
        np.testing.assert_allclose(U, ref, atol=1e-13)
    else:
        assert g is None
    nio.plot_history(tempdir / "history.png", flow.history, MPI.COMM_WORLD)
    f = fem.Function(u.space)
    f.interpolate(lambda x: x[0] * x[1])
    nio.plot_fields(tempdir / "fields.png", [("network", u.function), ("xy", f)])
    if MPI.COMM_WORLD.rank == 0:
        for name in ("history.png", "fields.png"):
            assert (tempdir / name).read_bytes()[:4] == b"\x89PNG"
