"""First-order baselines on the same energy and FE machinery: Adam and L-BFGS (torch.optim).

The parameter gradient is ``b = J^T e`` with the same assembled dual derivative ``e``
the natural-gradient flow uses, so comparisons differ only in the update rule.
A step record holds ``iteration``, ``energy``, ``energy_before``, ``n_params``,
``evaluations`` (energy evaluations so far), ``t_total`` and ``accepted`` (always True):
a subset of the keys of :class:`~nngf_fem.flow.NaturalGradientFlow` records.
"""

from nngf_fem._validate import as_int, as_real
from nngf_fem.control import NetworkControl, require
from nngf_fem.energies import EnergyFunctional
from nngf_fem.errors import FlowDivergedError
from nngf_fem.flow import FlowResult
from nngf_fem.mpi import raise_on_any

import math
import time
from typing import Any

import numpy as np
import torch

__all__ = ["TorchOptimizerFlow"]


class TorchOptimizerFlow:
    """Minimize an energy with a ``torch.optim`` optimizer (``"adam"`` or ``"lbfgs"``).

    Args:
        energy: the energy (same object the natural-gradient flow would use).
        optimizer: ``"adam"``, ``"lbfgs"``, or a ``torch.optim.Optimizer`` class.
        **options: optimizer options (e.g. ``lr=1e-3``; L-BFGS defaults to
            ``line_search_fn="strong_wolfe"``, ``max_iter=1`` per step with up to
            ``max_eval=25`` energy evaluations in its line search, and torch's stopping
            tolerances ``tolerance_grad``/``tolerance_change`` set to 0 so that a step
            never silently ends without moving; the run length is the caller's).
    """

    def __init__(self, energy: EnergyFunctional, optimizer: str | type = "adam", **options: Any):
        if not isinstance(energy, EnergyFunctional):
            raise TypeError(f"energy must be an EnergyFunctional, got {type(energy).__name__}")
        require(energy.field, NetworkControl, "TorchOptimizerFlow")
        self.energy, self.field, self.comm = energy, energy.field, energy.field.comm
        params = list(self.field.module.parameters())
        for key in ("lr", "max_eval", "max_iter", "history_size"):
            if key in options:  # torch's own errors do not say "numpy integers are fine"
                options[key] = (as_real(key, options[key], positive=True) if key == "lr"
                                else as_int(key, options[key], minimum=1))
        if isinstance(optimizer, str):
            name = optimizer.lower()
            if name == "adam":
                self.optimizer = torch.optim.Adam(params, **{"lr": 1e-3, **options})
            elif name == "lbfgs":
                opts = {"lr": 1.0, "max_iter": 1, "max_eval": 25, "history_size": 50,
                        "line_search_fn": "strong_wolfe", "tolerance_grad": 0.0,
                        "tolerance_change": 0.0, **options}
                self.optimizer = torch.optim.LBFGS(params, **opts)
            else:
                raise ValueError(f"optimizer={optimizer!r} is not known; allowed: 'adam', 'lbfgs'")
            self.name = name
        else:
            self.optimizer = optimizer(params, **options)
            self.name = optimizer.__name__.lower()
        self.iteration = 0
        self.history: list[dict[str, Any]] = []
        self.evaluations = 0

    def _closure(self) -> torch.Tensor:
        """Energy and parameter gradient ``J^T e`` at the module's current parameters."""
        self.optimizer.zero_grad()
        self.field.update()
        E = self.energy.value()
        raise_on_any(self.comm, not math.isfinite(E), f"energy is not finite ({E})",
                     FlowDivergedError)
        b = self.field.linearize().vjp(self.energy.derivative())
        for p, g in zip(self.field.module.parameters(), self.field.unflatten(b).values(),
                        strict=True):
            p.grad = g.clone()
        self.evaluations += 1
        return torch.tensor(E, dtype=torch.float64)

    def step(self) -> dict[str, Any]:
        """One optimizer step; returns its record."""
        t0 = time.perf_counter()
        E0 = float(self._closure()) if self.name != "lbfgs" else None
        if self.name == "lbfgs":
            E0 = float(self.optimizer.step(self._closure))
        else:
            self.optimizer.step()
        self.field.update()
        E1 = self.energy.value()
        rec = {"iteration": self.iteration, "energy": E1, "energy_before": E0,
               "n_params": self.field.num_params, "evaluations": self.evaluations,
               "t_total": time.perf_counter() - t0, "accepted": True}
        self.history.append(rec)
        self.iteration += 1
        return rec

    def run(self, max_iter: int = 100) -> FlowResult:
        """Run ``max_iter`` steps (a non-negative integer; numpy integers accepted)."""
        max_iter = as_int("max_iter", max_iter, minimum=0)
        for _ in range(max_iter):
            self.step()
        E = self.history[-1]["energy"] if self.history else self.energy.value()
        return FlowResult(False, "max_iter", self.iteration, E, self.history)

    def state_dict(self) -> dict[str, Any]:
        """Optimizer state and parameters."""
        return {"optimizer": self.optimizer.state_dict(), "iteration": self.iteration,
                "parameters": self.field.get_parameters(),
                "history": [dict(h) for h in self.history]}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore :meth:`state_dict`."""
        self.field.set_parameters(np.asarray(state["parameters"]))
        self.optimizer.load_state_dict(state["optimizer"])
        self.iteration = int(state["iteration"])
        self.history = [dict(h) for h in state["history"]]
