"""Exceptions raised by nngf_fem."""

__all__ = ["NNGFError", "SolverError", "FlowDivergedError"]


class NNGFError(RuntimeError):
    """Base class of nngf_fem runtime errors."""


class SolverError(NNGFError):
    """A PETSc Krylov/Newton solve did not converge.

    Attributes:
        reason: PETSc converged reason (negative on divergence).
        iterations: iterations taken.
    """

    def __init__(self, message: str, reason: int = 0, iterations: int = 0):
        super().__init__(message)
        self.reason = reason
        self.iterations = iterations


class FlowDivergedError(NNGFError):
    """The gradient flow produced a non-finite energy or could not decrease it."""
