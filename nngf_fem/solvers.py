"""A PETSc KSP wrapper with DOLFINx-style option handling.

Options are pushed into PETSc's options database under the object's prefix, read
with ``setFromOptions()`` and removed again, so nothing leaks between objects (the
``dolfinx.fem.petsc.LinearProblem`` convention).
"""

from nngf_fem.errors import SolverError

from collections.abc import Mapping
from typing import Any

from petsc4py import PETSc

__all__ = ["KrylovSolver", "set_options", "ksp_reason_name"]

_KSP_REASONS = {
    getattr(PETSc.KSP.ConvergedReason, n): n
    for n in dir(PETSc.KSP.ConvergedReason)
    if not n.startswith("_") and isinstance(getattr(PETSc.KSP.ConvergedReason, n), int)
}


def ksp_reason_name(reason: int) -> str:
    """Readable name of a PETSc ``KSPConvergedReason``."""
    return _KSP_REASONS.get(reason, str(reason))


def set_options(obj: Any, prefix: str, options: Mapping[str, Any]) -> None:
    """Apply ``options`` to a PETSc object through the options database, then clean up.

    Args:
        obj: PETSc object with ``setOptionsPrefix`` / ``setFromOptions``.
        prefix: options prefix, e.g. ``"nngf_riesz_"``.
        options: option name (without prefix and leading dash) to value.
    """
    obj.setOptionsPrefix(prefix)
    db = PETSc.Options()
    for k, v in options.items():
        db[prefix + k] = v
    obj.setFromOptions()
    for k in options:
        db.delValue(prefix + k)


class KrylovSolver:
    """Solve ``A x = b`` with a configurable PETSc KSP.

    Args:
        A: operator (assembled or shell matrix).
        petsc_options_prefix: prefix for this solver's options (required, as in DOLFINx).
        petsc_options: user options, override ``defaults``.
        defaults: default options of the caller (e.g. CG + GAMG).
        raise_on_failure: raise :class:`SolverError` when the KSP diverges.
        P: optional preconditioning matrix.
    """

    def __init__(
        self,
        A: PETSc.Mat,
        *,
        petsc_options_prefix: str,
        petsc_options: Mapping[str, Any] | None = None,
        defaults: Mapping[str, Any] | None = None,
        raise_on_failure: bool = True,
        P: PETSc.Mat | None = None,
    ):
        if not isinstance(petsc_options_prefix, str) or not petsc_options_prefix:
            raise ValueError(
                f"petsc_options_prefix must be a non-empty string, got {petsc_options_prefix!r}"
            )
        self.prefix = petsc_options_prefix
        self.raise_on_failure = raise_on_failure
        self.ksp = PETSc.KSP().create(A.getComm())
        self.ksp.setOperators(A, A if P is None else P)
        opts = dict(defaults or {})
        opts.update(petsc_options or {})
        set_options(self.ksp, self.prefix, opts)
        self.iterations = 0
        self.reason = 0
        self.converged = True

    def solve(self, b: PETSc.Vec, x: PETSc.Vec) -> int:
        """Solve into ``x``; returns the number of iterations.

        Raises:
            SolverError: if the solve diverged and ``raise_on_failure`` is set.
        """
        self.ksp.solve(b, x)
        self.iterations = self.ksp.getIterationNumber()
        self.reason = self.ksp.getConvergedReason()
        self.converged = self.reason > 0
        if not self.converged:
            # a failed set-up (e.g. a zero pivot) sticks to the PC: start afresh next time
            A, P = self.ksp.getOperators()
            self.ksp.reset()
            self.ksp.setOperators(A, P)
        if not self.converged and self.raise_on_failure:
            raise SolverError(
                f"Krylov solve '{self.prefix}' failed: reason {ksp_reason_name(self.reason)} "
                f"({self.reason}) after {self.iterations} iterations",
                reason=self.reason,
                iterations=self.iterations,
            )
        return self.iterations

    def destroy(self) -> None:
        """Destroy the PETSc KSP."""
        if self.ksp is not None:
            self.ksp.destroy()
            self.ksp = None

    def __del__(self):
        try:
            self.destroy()
        except Exception:  # pragma: no cover - interpreter shutdown
            pass
