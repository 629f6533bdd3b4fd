"""A PETSc KSP wrapper with DOLFINx-style option handling.

Options are pushed into PETSc's options database under the object's prefix, read
with ``setFromOptions()`` and removed again, so nothing leaks between objects (the
``dolfinx.fem.petsc.LinearProblem`` convention); values that were in the database
before (e.g. from the command line) are restored afterwards. :class:`KrylovSolver`
pushes its options again around every solve: options that PETSc reads only when the
preconditioner is set up (``mat_mumps_icntl_14``, ``mg_levels_ksp_type``, ...) take
effect too.

**Misspelled options.** PETSc ignores options it does not know (``ksp_rtoll``). An
option of the user's that PETSc did not use gets a :class:`PETScOptionsWarning` naming
the option and the prefix, once per process: from :func:`set_options` right after
``setFromOptions()``, from :class:`KrylovSolver` after its first solve (only then has
PETSc read the set-up options of the preconditioner and the factorization). Options
that do not apply to the chosen type (``ksp_gmres_restart`` with CG) are reported
too: they have no effect either. Defaults of the package are not checked.
"""

from nngf_fem.errors import SolverError

import contextlib
import warnings
from collections.abc import Collection, Iterator, Mapping
from typing import Any

from petsc4py import PETSc

__all__ = ["KrylovSolver", "PETScOptionsWarning", "set_options", "pushed_options",
           "ksp_reason_name"]

_KSP_REASONS = {
    getattr(PETSc.KSP.ConvergedReason, n): n
    for n in dir(PETSc.KSP.ConvergedReason)
    if not n.startswith("_") and isinstance(getattr(PETSc.KSP.ConvergedReason, n), int)
}

#: (prefix, option) pairs already warned about in this process
_WARNED: set[tuple[str, str]] = set()


class PETScOptionsWarning(UserWarning):
    """A PETSc option given by the user was not used by PETSc (misspelled or not applicable)."""


def ksp_reason_name(reason: int) -> str:
    """Readable name of a PETSc ``KSPConvergedReason``."""
    return _KSP_REASONS.get(reason, str(reason))


@contextlib.contextmanager
def pushed_options(prefix: str, options: Mapping[str, Any]) -> Iterator[PETSc.Options]:
    """Put ``options`` into PETSc's options database under ``prefix`` for a ``with`` block.

    On exit the options are removed again, and values that were in the database
    before (e.g. given on the command line) are restored.

    Args:
        prefix: options prefix, e.g. ``"nngf_riesz_"``.
        options: option name (without prefix and leading dash) to value (``None`` for
            a flag such as ``ksp_view``).

    Yields:
        The options database.
    """
    db = PETSc.Options()
    saved: dict[str, Any] = {}
    try:
        for k, v in options.items():
            name = prefix + k
            if db.hasName(name):
                saved[name] = db.getString(name, None)
            db[name] = v
        yield db
    finally:
        for k in options:
            name = prefix + k
            if name in saved:
                db[name] = saved[name]
            elif db.hasName(name):
                db.delValue(name)


def _unused(db: PETSc.Options, prefix: str, names: Collection[str]) -> list[str]:
    return [k for k in names if not db.used(prefix + k)]


def _warn_unused(prefix: str, names: Collection[str], stacklevel: int = 3) -> None:
    for k in names:
        if (prefix, k) in _WARNED:
            continue
        _WARNED.add((prefix, k))
        warnings.warn(f"PETSc option '{k}' (prefix '{prefix}', i.e. -{prefix}{k}) was not used "
                      "by PETSc: misspelled, or not applicable to the chosen solver type? "
                      "It has no effect", PETScOptionsWarning, stacklevel=stacklevel)


def set_options(obj: Any, prefix: str, options: Mapping[str, Any], *,
                warn_unused: bool | Collection[str] = True) -> list[str]:
    """Apply ``options`` to a PETSc object through the options database, then clean up.

    Args:
        obj: PETSc object with ``setOptionsPrefix`` / ``setFromOptions``.
        prefix: options prefix, e.g. ``"nngf_riesz_"``.
        options: option name (without prefix and leading dash) to value.
        warn_unused: warn (:class:`PETScOptionsWarning`, once per process and option)
            about options that ``setFromOptions()`` did not use: ``True`` all of
            ``options``, ``False`` none, or a collection of the names to check (e.g.
            the user's options, not the caller's defaults).

    Returns:
        The names of the options that ``setFromOptions()`` did not use.
    """
    obj.setOptionsPrefix(prefix)
    with pushed_options(prefix, options) as db:
        obj.setFromOptions()
        unused = _unused(db, prefix, options)
    check = options if warn_unused is True else (warn_unused or ())
    _warn_unused(prefix, [k for k in unused if k in check])
    return unused


class KrylovSolver:
    """Solve ``A x = b`` with a configurable PETSc KSP.

    The options are in PETSc's database during ``setFromOptions()`` and during every
    solve (so that options read at the preconditioner's set-up work); a user option that
    PETSc has not used by the end of the first solve gets a :class:`PETScOptionsWarning`.

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
        self.options = opts
        user = set(petsc_options or {})
        #: user options not used by setFromOptions(): checked again after the first solve
        self._unchecked: list[str] | None = [
            k for k in set_options(self.ksp, self.prefix, opts, warn_unused=False) if k in user]
        self.iterations = 0
        self.reason = 0
        self.converged = True

    def solve(self, b: PETSc.Vec, x: PETSc.Vec, transpose: bool = False) -> int:
        """Solve ``A x = b`` (``A^T x = b`` with ``transpose``); returns the iterations.

        Raises:
            SolverError: if the solve diverged and ``raise_on_failure`` is set.
        """
        with pushed_options(self.prefix, self.options) as db:  # set-up options (PCSetUp)
            try:
                (self.ksp.solveTranspose if transpose else self.ksp.solve)(b, x)
            finally:
                if self._unchecked is not None:
                    _warn_unused(self.prefix, _unused(db, self.prefix, self._unchecked))
                    self._unchecked = None
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
