"""Taylor tests of energy derivatives in parameter space (the pyadjoint habit).

``r(h) = |E(theta + h dtheta) - E(theta) - h b . dtheta|`` with ``b = J^T E'(u)`` must
decay like ``h^2``; :func:`taylor_test` returns the residuals and observed rates.
Use it on your own setups before running a flow.
"""

from nngf_fem.energies import EnergyFunctional

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

__all__ = ["TaylorResult", "taylor_test"]


@dataclass
class TaylorResult:
    """Residuals ``r(h_i)`` for ``h_i = h0 2^-i`` and the rates ``log2(r_i / r_{i+1})``.

    ``rates`` are the ``n - 1`` consecutive rates in the asymptotic regime: residuals
    above the round-off floor of ``E``, and among those the run of rates closest to the
    Taylor order (large steps may lie outside the regime where the quadratic term
    dominates, tiny ones drown in round-off). ``all_rates`` has every rate of the sweep
    and ``window`` says where ``rates`` sit in it.
    """

    steps: np.ndarray
    residuals: np.ndarray
    rates: np.ndarray
    all_rates: np.ndarray | None = None
    window: slice | None = None

    @property
    def min_rate(self) -> float:
        """Smallest rate in the asymptotic window (2 for a correct derivative)."""
        return float(np.min(self.rates))


def parameter_derivative(energy: EnergyFunctional) -> np.ndarray:
    """``b = J^T E'(u)``: the derivative of ``E(theta)`` (identical on all ranks)."""
    energy.field.update()
    return energy.field.linearize().vjp(energy.derivative())


def remainders(energy: EnergyFunctional, move: Callable[[float], None], E0: float,
               slope: float, steps: np.ndarray) -> np.ndarray:
    """Taylor remainders ``|E(x + h d) - E(x) - h slope|`` for each step ``h``.

    ``move(h)`` puts the unknowns at ``x + h d`` (network parameters, FE nodal values
    ...); the caller restores ``x`` afterwards.
    """
    res = []
    for h in steps:
        move(h)
        res.append(abs(energy.value() - E0 - h * slope))
    return np.array(res)


def _window(res: np.ndarray, rates: np.ndarray, floor: float, width: int) -> slice | None:
    """The ``width`` consecutive rates above the round-off floor with the best minimum."""
    ok = (res[:-1] > floor) & (res[1:] > floor)
    best, best_min = None, -np.inf
    for i in range(len(rates) - width + 1):
        if ok[i : i + width].all():
            m = float(np.min(rates[i : i + width]))
            if m > best_min:
                best, best_min = slice(i, i + width), m
    return best


def taylor_test(energy: EnergyFunctional, direction: np.ndarray | None = None,
                h0: float = 1e-2, n: int = 5, seed: int = 0, extra: int = 6) -> TaylorResult:
    """Second-order Taylor test of ``E(theta)`` around the current parameters.

    The remainder ``r(h)`` is computed for ``n + extra`` halvings of ``h0``; the
    result's ``rates`` (and :attr:`~TaylorResult.min_rate`) are the ``n - 1`` consecutive
    rates in the asymptotic regime (see :class:`TaylorResult`), so a correct derivative reads as
    rate 2 whatever the scale of the problem. ``extra=0`` gives the plain test.

    Args:
        energy: any nngf_fem energy.
        direction: parameter-space direction (default: seeded Gaussian, same on all
            ranks, scaled to the norm of the parameters).
        h0: first step.
        n: number of steps in the reported window.
        seed: seed of the default direction.
        extra: additional halvings searched for the asymptotic window.
    """
    field = energy.field
    theta = field.get_parameters()
    if direction is None:
        direction = np.random.default_rng(seed).standard_normal(theta.size)
        direction *= max(np.linalg.norm(theta), 1.0) / np.linalg.norm(direction)
    direction = np.asarray(direction, dtype=np.float64)
    if direction.shape != theta.shape:
        raise ValueError(f"direction must have shape {theta.shape}, got {direction.shape}")
    if not isinstance(n, int | np.integer) or n < 2:
        raise ValueError(f"n must be an integer >= 2, got {n!r}")
    try:
        E0 = energy.value()
        slope = float(parameter_derivative(energy) @ direction)
        hs = h0 * 0.5 ** np.arange(n + max(int(extra), 0))
        res = remainders(energy, lambda h: field.set_parameters(theta + h * direction), E0,
                         slope, hs)
    finally:
        field.set_parameters(theta)
    with np.errstate(divide="ignore", invalid="ignore"):
        rates = np.log2(res[:-1] / res[1:])
    floor = 1e4 * np.finfo(float).eps * max(abs(E0), abs(slope) * h0, 1e-300)
    window = _window(res, rates, floor, n - 1) if extra > 0 else None
    if window is None:
        window = slice(0, n - 1)
    return TaylorResult(hs, res, rates[window], rates, window)
