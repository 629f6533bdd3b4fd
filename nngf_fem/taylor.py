"""Taylor tests of energy derivatives in parameter space (the pyadjoint habit).

``r(h) = |E(theta + h dtheta) - E(theta) - h b . dtheta|`` with ``b = J^T E'(u)`` must
decay like ``h^2``; :func:`taylor_test` returns the residuals and observed rates.
Use it on your own setups before running a flow.
"""

from nngf_fem.energies import EnergyFunctional

from dataclasses import dataclass

import numpy as np

__all__ = ["TaylorResult", "taylor_test"]


@dataclass
class TaylorResult:
    """Residuals ``r(h_i)`` for ``h_i = h0 2^-i`` and the rates ``log2(r_i / r_{i+1})``."""

    steps: np.ndarray
    residuals: np.ndarray
    rates: np.ndarray

    @property
    def min_rate(self) -> float:
        """Smallest observed rate (2 for a correct derivative)."""
        return float(np.min(self.rates))


def parameter_derivative(energy: EnergyFunctional) -> np.ndarray:
    """``b = J^T E'(u)``: the derivative of ``E(theta)`` (identical on all ranks)."""
    energy.field.update()
    return energy.field.linearize().vjp(energy.derivative())


def taylor_test(energy: EnergyFunctional, direction: np.ndarray | None = None,
                h0: float = 1e-2, n: int = 5, seed: int = 0) -> TaylorResult:
    """Second-order Taylor test of ``E(theta)`` around the current parameters.

    Args:
        energy: any nngf_fem energy.
        direction: parameter-space direction (default: seeded Gaussian, same on all
            ranks, scaled to the norm of the parameters).
        h0: first step.
        n: number of halvings.
        seed: seed of the default direction.
    """
    field = energy.field
    theta = field.get_parameters()
    if direction is None:
        direction = np.random.default_rng(seed).standard_normal(theta.size)
        direction *= max(np.linalg.norm(theta), 1.0) / np.linalg.norm(direction)
    direction = np.asarray(direction, dtype=np.float64)
    if direction.shape != theta.shape:
        raise ValueError(f"direction must have shape {theta.shape}, got {direction.shape}")
    try:
        E0 = energy.value()
        slope = float(parameter_derivative(energy) @ direction)
        hs = h0 * 0.5 ** np.arange(n)
        res = []
        for h in hs:
            field.set_parameters(theta + h * direction)
            res.append(abs(energy.value() - E0 - h * slope))
    finally:
        field.set_parameters(theta)
    res = np.array(res)
    rates = np.log2(res[:-1] / res[1:])
    return TaylorResult(hs, res, rates)
