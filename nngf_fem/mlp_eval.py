"""Explicit values and parameter Jacobian of an MLP field at fixed points, for any ``theta``.

The inner loops of the flow -- the network fit of a projected Gauss-Newton step
(:func:`~nngf_fem.curvature.fit_network`) and every linearization -- evaluate the same
network at the same points many times. Through ``torch.nn.Module`` calls, forward hooks
and autograd, one evaluation of a small network on a few thousand points costs a few
hundred microseconds of Python overhead and one Jacobian a millisecond or more, several
times the arithmetic. :class:`MLPEvaluator` does the arithmetic directly: one forward
sweep of the layers in a transposed (neurons x points) layout keeps the activations,
one backward sweep of the per-point output sensitivities gives every column of ``J``:

    u = lift + factor * T(W_L h_L + b_L + o),     h_l = s(z_l),  z_l = W_l h_{l-1} + b_l,
    dU/db_L = factor T',  dU/dW_L = factor T' h_L,
    delta_L = factor T' W_L * s'(z_L),  delta_{l-1} = (W_l^T delta_l) * s'(z_{l-1}),
    dU/dW_l[o, i] = delta_l[o] h_{l-1}[i],  dU/db_l = delta_l.

It covers :class:`~nngf_fem.models.MLP` networks (any depth and widths, after width
growth too, no residual blocks) with the activations ``tanh``, ``sigmoid``, ``softplus``
and ``sin``, a scalar output and the transforms ``identity``, ``exp`` and ``softplus``;
:meth:`MLPEvaluator.build` returns None for anything else and callers use torch.
Elementwise functions run in torch (its vectorized kernels), matrix products in numpy
BLAS; results agree with the torch path to round-off.
"""

from collections.abc import Callable

import numpy as np
import torch

__all__ = ["MLPEvaluator"]


def _t(a: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(a)


def _tanh(z):
    # tanh z = 2 sigmoid(2 z) - 1: torch's float64 sigmoid is vectorized, its tanh is not
    # (2-3x slower); the two agree to ~3e-16 absolute
    a = torch.sigmoid(_t(2.0 * z)).numpy()
    a *= 2.0
    a -= 1.0
    return a, 1.0 - a * a


def _sigmoid(z):
    a = torch.sigmoid(_t(z)).numpy()
    return a, a * (1.0 - a)


def _softplus_act(z):  # torch's default softplus: beta 1, threshold 20
    zt = _t(z)
    return (torch.nn.functional.softplus(zt).numpy(),
            torch.where(zt > 20.0, 1.0, torch.sigmoid(zt)).numpy())


def _sin(z):
    zt = _t(z)
    return torch.sin(zt).numpy(), torch.cos(zt).numpy()


#: activation name -> (activation, derivative) on numpy arrays
_ACTIVATIONS: dict[str, Callable] = {"tanh": _tanh, "sigmoid": _sigmoid,
                                     "softplus": _softplus_act, "sin": _sin}


def _t_identity(y):
    return y, np.ones_like(y)


def _t_exp(y):
    k = torch.exp(_t(y)).numpy()
    return k, k


def _t_softplus(y):  # the field's softplus transform: threshold 50 (float64-exact)
    yt = _t(y)
    return (torch.nn.functional.softplus(yt, threshold=50.0).numpy(),
            torch.where(yt > 50.0, 1.0, torch.sigmoid(yt)).numpy())


#: transform name -> (T, T') on numpy arrays
_TRANSFORMS: dict[str, Callable] = {"identity": _t_identity, "exp": _t_exp,
                                    "softplus": _t_softplus}


class MLPEvaluator:
    """Values and ``J`` of ``u = lift + factor * T(N_theta + o)`` at fixed points.

    Build it with :meth:`build` (None when the field or its module is not covered); it
    holds the points (transposed inputs), the offset, factor and lift at them and the
    parameter layout of the module when it was built (``shapes``): a grown module
    needs a new evaluator (:meth:`~nngf_fem.field.NeuralField.point_evaluator` builds it).

    Args:
        inputs: network inputs at the points, ``(n, d_in)``.
        shapes: ``[(n_out, n_in), ...]`` of the hidden layers, then the output layer.
        activation: the hidden activation's name (a key of the supported ones).
        transform: the field's transform name.
        offset, factor, lift: per-point arrays ``(n,)`` or None.
    """

    def __init__(self, inputs: np.ndarray, shapes: list[tuple[int, int]], activation: str,
                 transform: str, offset: np.ndarray | None = None,
                 factor: np.ndarray | None = None, lift: np.ndarray | None = None):
        self.xT = np.ascontiguousarray(np.asarray(inputs, dtype=np.float64).T)
        self.n = self.xT.shape[1]
        self.shapes = [tuple(s) for s in shapes]
        self.num_params = sum(o * i + o for o, i in self.shapes)
        self._act = _ACTIVATIONS[activation]
        self._transform = _TRANSFORMS[transform]
        self.offset, self.factor, self.lift = offset, factor, lift
        #: the last sweep (parameters, activations): values at a fit's trial point and
        #: the Jacobian at the same point, once accepted, share one forward sweep
        self._last: tuple[np.ndarray, tuple] | None = None

    # -------------------------------------------------------------- building
    @classmethod
    def build(cls, field) -> "MLPEvaluator | None":
        """An evaluator for ``field`` (a :class:`~nngf_fem.field.NeuralField`) or None.

        None unless the module is an :class:`~nngf_fem.models.MLP` without residual
        blocks, with a supported activation and biases on every layer, a scalar output,
        no extra inputs ``mu`` and a named transform of the supported ones.
        """
        from nngf_fem.models import MLP

        module = field.module
        if (type(module) is not MLP or len(module.blocks) or field.value_size != 1
                or getattr(field, "_mu", None) is not None
                or module.activation_name not in _ACTIVATIONS
                or getattr(field, "named_transform", None) not in _TRANSFORMS):
            return None
        layers = [*module.hidden_layers, module.output_layer]
        if any(layer.bias is None for layer in layers):
            return None
        names = [n for n, _ in module.named_parameters()]
        expected = [f"hidden_layers.{i}.{k}" for i in range(len(module.hidden_layers))
                    for k in ("weight", "bias")] + ["output_layer.weight", "output_layer.bias"]
        if names != expected:
            return None
        x = field._torch_points()
        with torch.no_grad():
            o = field.offset_at(x)
            f = field.factor(x) if field.factor is not None else None
            g = field.lift(x) if field.lift is not None else None

        def flat(v):
            return None if v is None else np.ascontiguousarray(
                np.broadcast_to(v.detach().numpy().reshape(-1), (x.shape[0],)), dtype=np.float64)

        return cls(x.numpy(), [tuple(layer.weight.shape) for layer in layers],
                   module.activation_name, field.named_transform, flat(o), flat(f), flat(g))

    # ------------------------------------------------------------ evaluation
    def _unpack(self, theta: np.ndarray) -> list[tuple[np.ndarray, np.ndarray]]:
        theta = np.asarray(theta, dtype=np.float64)
        if theta.shape != (self.num_params,):
            raise ValueError(f"theta must have shape ({self.num_params},), got {theta.shape}")
        out, i = [], 0
        for n_out, n_in in self.shapes:
            W = theta[i:i + n_out * n_in].reshape(n_out, n_in)
            i += n_out * n_in
            out.append((W, theta[i:i + n_out]))
            i += n_out
        return out

    def _forward(self, theta: np.ndarray):
        theta = np.asarray(theta, dtype=np.float64)
        last = self._last
        if last is not None and last[0].shape == theta.shape and np.array_equal(last[0], theta):
            return last[1]  # the same parameters as the last sweep (a fit's accepted trial)
        theta = theta.copy()  # the kept sweep's weights are views of it
        out = self._sweep(theta)
        self._last = (theta, out)
        return out

    def _sweep(self, theta: np.ndarray):
        layers = self._unpack(theta)
        h = self.xT
        hs, ds = [h], []
        for W, b in layers[:-1]:
            z = W @ h
            z += b[:, None]
            h, dh = self._act(z)
            hs.append(h)
            ds.append(dh)
        W, b = layers[-1]
        y = (W @ h)[0] + b[0]
        if self.offset is not None:
            y = y + self.offset
        k, dk = self._transform(y)
        if self.factor is not None:
            k, dk = k * self.factor, dk * self.factor
        if self.lift is not None:
            k = k + self.lift
        return layers, hs, ds, k, dk

    def values(self, theta: np.ndarray) -> np.ndarray:
        """``u`` at the points for the flat parameters ``theta``, ``(n,)``."""
        return self._forward(theta)[3].copy()

    def output_sensitivity(self, theta: np.ndarray) -> np.ndarray:
        """``du/dN = factor T'(N + o)`` at the points, ``(n,)``."""
        return self._forward(theta)[4].copy()

    def jacobian(self, theta: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """``(u, J)``: the values and the column-major Jacobian ``(n, P)`` at ``theta``.

        Columns in the order of the module's parameters (as ``get_parameters``).
        """
        layers, hs, ds, k, s = self._forward(theta)
        J = np.empty((self.n, self.num_params), order="F")
        JT = J.T  # (P, n), C-ordered: each column of J is a contiguous row here
        cols, col = [], 0
        for n_out, n_in in self.shapes:
            cols.append((col, col + n_out * n_in, col + n_out * n_in + n_out))
            col += n_out * n_in + n_out
        # output layer: dU/dW_L = s h_L, dU/db_L = s
        c0, c1, c2 = cols[-1]
        np.multiply(hs[-1], s[None, :], out=JT[c0:c1])
        JT[c1] = s
        delta = layers[-1][0].T * s[None, :]  # (w_L, n): sensitivity of h_L
        for li in range(len(layers) - 2, -1, -1):
            delta *= ds[li]  # sensitivity of z_l
            n_out, n_in = self.shapes[li]
            c0, c1, c2 = cols[li]
            np.multiply(delta[:, None, :], hs[li][None, :, :],
                        out=JT[c0:c1].reshape(n_out, n_in, self.n))
            JT[c1:c2] = delta
            if li:
                delta = layers[li][0].T @ delta
        return k.copy(), J

