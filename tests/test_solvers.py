"""KrylovSolver: options by prefix, failures reported and recoverable."""

import nngf_fem as nf
from nngf_fem.solvers import PETScOptionsWarning

import warnings

import numpy as np
import pytest
from mpi4py import MPI
from petsc4py import PETSc


def diag_matrix(values):
    comm = MPI.COMM_WORLD
    n = len(values)
    A = PETSc.Mat().createAIJ(((PETSc.DECIDE, n), (PETSc.DECIDE, n)), nnz=1, comm=comm)
    r0, r1 = A.getOwnershipRange()
    for i in range(r0, r1):
        A.setValue(i, i, values[i])
    A.assemble()
    return A


def test_failed_factorization_is_reported_and_recoverable():
    A = diag_matrix(np.array([1.0, 0.0, 2.0, 3.0]))
    solver = nf.KrylovSolver(A, petsc_options_prefix="test_lu_",
                             defaults={"ksp_type": "preonly", "pc_type": "lu"})
    b, x = A.createVecs()
    b.set(1.0)
    with pytest.raises(nf.SolverError, match="DIVERGED_PC"):
        solver.solve(b, x)
    assert not solver.converged and solver.reason < 0
    r0, r1 = A.getOwnershipRange()
    if r0 <= 1 < r1:
        A.setValue(1, 1, 4.0)
    A.assemble()
    solver.ksp.setOperators(A)
    solver.solve(b, x)
    assert solver.converged
    np.testing.assert_allclose(x.array_r, 1.0 / np.array([1.0, 4.0, 2.0, 3.0])[r0:r1])
    # the options were removed from the database again
    assert not PETSc.Options().hasName("test_lu_ksp_type")
    for obj in (solver, A, b, x):
        obj.destroy()


def test_prefix_is_required():
    A = diag_matrix(np.ones(2))
    with pytest.raises(ValueError, match="petsc_options_prefix"):
        nf.KrylovSolver(A, petsc_options_prefix="")
    A.destroy()


def laplace_matrix(n=64):
    """1D finite-difference ``-u'' + u`` (SPD) on COMM_WORLD."""
    A = PETSc.Mat().createAIJ(((PETSc.DECIDE, n), (PETSc.DECIDE, n)), nnz=3,
                              comm=MPI.COMM_WORLD)
    r0, r1 = A.getOwnershipRange()
    for i in range(r0, r1):
        A.setValue(i, i, 2.0 + 1.0 / n**2)
        for j in (i - 1, i + 1):
            if 0 <= j < n:
                A.setValue(i, j, -1.0)
    A.assemble()
    return A


def solve_once(A, prefix, options, defaults=None):
    solver = nf.KrylovSolver(A, petsc_options_prefix=prefix, petsc_options=options,
                             defaults=defaults)
    b, x = A.createVecs()
    b.set(1.0)
    solver.solve(b, x)
    b.destroy()
    x.destroy()
    return solver


LU = {"ksp_type": "preonly", "pc_type": "lu", "pc_factor_mat_solver_type": "mumps"}
GAMG = {"ksp_type": "cg", "pc_type": "gamg", "ksp_rtol": 1e-10, "pc_gamg_threshold": 0.02}


def test_correct_petsc_options_do_not_warn_and_take_effect():
    """Options read only at PCSetUp (MUMPS ICNTL, multigrid levels) are used, no warning."""
    A = laplace_matrix()
    with warnings.catch_warnings():
        warnings.simplefilter("error", PETScOptionsWarning)
        lu = solve_once(A, "t_good_lu_", {**LU, "mat_mumps_icntl_14": 40, "ksp_view": None})
        assert lu.ksp.getPC().getFactorMatrix().getMumpsIcntl(14) == 40
        mg = solve_once(A, "t_good_mg_", {**GAMG, "mg_levels_ksp_type": "richardson",
                                          "mg_levels_pc_type": "jacobi"})
        assert mg.ksp.getPC().getMGSmoother(1).getType() == "richardson"
        assert mg.converged
        # defaults of the caller that do not apply (MUMPS with user CG/Jacobi) are not checked
        solve_once(A, "t_good_def_", {"ksp_type": "cg", "pc_type": "jacobi"}, defaults=LU)
    for name in ("t_good_lu_mat_mumps_icntl_14", "t_good_mg_mg_levels_ksp_type"):
        assert not PETSc.Options().hasName(name)  # removed again after the solve
    for obj in (lu, mg, A):
        obj.destroy()


@pytest.mark.parametrize("base,typo", [(LU, "ksp_rtoll"), (LU, "mat_mumps_icntl_144"),
                                       (GAMG, "pc_gamg_thresholdd"),
                                       (GAMG, "mg_levles_ksp_type")])
def test_misspelled_petsc_option_warns_once_naming_option_and_prefix(base, typo):
    A = laplace_matrix()
    prefix = f"t_typo_{typo}_"
    with pytest.warns(PETScOptionsWarning, match=rf"'{typo}' \(prefix '{prefix}'") as rec:
        solver = solve_once(A, prefix, {**base, typo: "1"})
    assert len([w for w in rec if issubclass(w.category, PETScOptionsWarning)]) == 1
    assert solver.converged
    with warnings.catch_warnings():  # once per process and option
        warnings.simplefilter("error", PETScOptionsWarning)
        solve_once(A, prefix, {**base, typo: "1"}).destroy()
    solver.destroy()
    A.destroy()


def test_set_options_warns_right_away_and_restores_command_line_values():
    db = PETSc.Options()
    db["t_set_ksp_type"] = "gmres"  # as if given on the command line
    ksp = PETSc.KSP().create(MPI.COMM_WORLD)
    with pytest.warns(PETScOptionsWarning, match=r"'ksp_typo' \(prefix 't_set_'"):
        unused = nf.solvers.set_options(ksp, "t_set_", {"ksp_type": "cg", "ksp_typo": 1})
    assert unused == ["ksp_typo"] and ksp.getType() == "cg"
    assert db.getString("t_set_ksp_type") == "gmres" and not db.hasName("t_set_ksp_typo")
    db.delValue("t_set_ksp_type")
    with warnings.catch_warnings():
        warnings.simplefilter("error", PETScOptionsWarning)
        assert nf.solvers.set_options(ksp, "t_set2_", {"ksp_typo": 1},
                                      warn_unused=False) == ["ksp_typo"]
    ksp.destroy()
