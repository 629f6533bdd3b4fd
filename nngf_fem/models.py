"""Float64 networks that support function-preserving growth.

Growth protocol (:func:`expand_width`, :func:`expand_depth`; the flow's growth step
:meth:`~nngf_fem.flow.NaturalGradientFlow.grow` calls them): a growable module exposes

* ``hidden_layers`` -- the list of ``nn.Linear`` layers whose outputs are hidden
  activations, and ``output_layer`` -- the final ``nn.Linear``;
* ``features(x, upto)`` -- the input of hidden layer ``upto`` (i.e. the previous
  layer's activation, or ``x`` itself for ``upto == 0``); ``upto = len(hidden_layers)``
  gives the input of the output layer (after the residual blocks);
* ``blocks`` -- a ``ModuleList`` of :class:`ResidualBlock` applied after the last
  hidden layer (depth growth appends identity-initialized blocks here);
* ``activation`` -- the elementwise nonlinearity.

:class:`MLP` and :class:`ResMLP` implement it; a user module that does too can be
grown by the library.
"""

from nngf_fem._validate import as_int

import numpy as np
import torch
from torch import nn

__all__ = ["MLP", "ResMLP", "ResidualBlock", "expand_depth", "expand_width", "get_activation"]

_ACTIVATIONS = {
    "tanh": torch.tanh,
    "sigmoid": torch.sigmoid,
    "softplus": nn.functional.softplus,
    "gelu": nn.functional.gelu,
    "silu": nn.functional.silu,
    "sin": torch.sin,
}


def get_activation(name: str):
    """Activation function by name (tanh, sigmoid, softplus, gelu, silu, sin)."""
    try:
        return _ACTIVATIONS[name]
    except KeyError:
        raise ValueError(
            f"activation={name!r} is not known; allowed: {sorted(_ACTIVATIONS)}"
        ) from None


def _check_dims(**dims: int) -> list[int]:
    """Each dimension as a Python int >= 1 (numpy integers accepted), in order."""
    return [as_int(name, v, minimum=1) for name, v in dims.items()]


class MLP(nn.Module):
    """Fully connected network ``x -> W_L s(... s(W_1 x + b_1) ...) + b_L`` (float64).

    Args:
        in_dim: input dimension (geometric dimension, plus extra inputs).
        width: neurons per hidden layer (int or list of ints, one per layer; numpy
            integers are accepted).
        depth: number of hidden layers (ignored if ``width`` is a list).
        out_dim: output dimension.
        activation: name of the activation (default ``tanh``).
        dtype: parameter dtype (default float64).
    """

    def __init__(
        self,
        in_dim: int,
        width: int | list[int] = 16,
        depth: int = 1,
        out_dim: int = 1,
        activation: str = "tanh",
        dtype: torch.dtype = torch.float64,
    ):
        super().__init__()
        if isinstance(width, list | tuple) or getattr(width, "ndim", 0) == 1:
            width = list(width)
            if not width:
                raise ValueError("width must be a positive integer or a non-empty list of them, "
                                 "got []")
            widths = [as_int(f"width[{i}]", w, minimum=1) for i, w in enumerate(width)]
        else:
            widths = [as_int("width", width, minimum=1)] * as_int("depth", depth, minimum=1)
        in_dim, out_dim = _check_dims(in_dim=in_dim, out_dim=out_dim)
        self.in_dim, self.out_dim, self.activation_name = in_dim, out_dim, activation
        self.activation = get_activation(activation)
        dims = [in_dim, *widths]
        self.hidden_layers = nn.ModuleList(
            nn.Linear(dims[i], dims[i + 1], dtype=dtype) for i in range(len(widths))
        )
        self.output_layer = nn.Linear(dims[-1], out_dim, dtype=dtype)
        self.blocks = nn.ModuleList()  # residual blocks inserted by depth growth

    @property
    def widths(self) -> list[int]:
        """Current hidden widths."""
        return [layer.out_features for layer in self.hidden_layers]

    def features(self, x: torch.Tensor, upto: int) -> torch.Tensor:
        """Input of hidden layer ``upto`` (``len(hidden_layers)``: input of the output layer)."""
        h = x
        for layer in self.hidden_layers[:upto]:
            h = self.activation(layer(h))
        if upto == len(self.hidden_layers):
            for block in self.blocks:
                h = block(h)
        return h

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Evaluate at points ``x`` of shape ``(n, in_dim)``; returns ``(n, out_dim)``."""
        return self.output_layer(self.features(x, len(self.hidden_layers)))

    def extra_repr(self) -> str:  # noqa: D102
        return f"widths={self.widths}, activation={self.activation_name}"


class ResidualBlock(nn.Module):
    """``h -> h + V s(W h + c)``; identity when ``V = 0``."""

    def __init__(self, dim: int, inner: int, activation, dtype: torch.dtype = torch.float64):
        super().__init__()
        self.inner = nn.Linear(dim, inner, dtype=dtype)
        self.outer = nn.Linear(inner, dim, bias=False, dtype=dtype)
        self.activation = activation

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        """Apply the block."""
        return h + self.outer(self.activation(self.inner(h)))


class ResMLP(nn.Module):
    """Residual MLP: lifting layer, residual blocks, linear output (float64).

    ``x -> h_0 = s(W_0 x + b_0) -> h_{i+1} = h_i + V_i s(W_i h_i + c_i) -> W_out h + b``.

    Args:
        in_dim: input dimension.
        width: width of the lifting layer and of the residual stream.
        depth: number of residual blocks.
        out_dim: output dimension.
        activation: activation name.
        dtype: parameter dtype.
    """

    def __init__(
        self,
        in_dim: int,
        width: int = 16,
        depth: int = 1,
        out_dim: int = 1,
        activation: str = "tanh",
        dtype: torch.dtype = torch.float64,
    ):
        super().__init__()
        in_dim, width, out_dim = _check_dims(in_dim=in_dim, width=width, out_dim=out_dim)
        depth = as_int("depth", depth, minimum=0)
        self.in_dim, self.out_dim, self.activation_name = in_dim, out_dim, activation
        self.activation = get_activation(activation)
        self.hidden_layers = nn.ModuleList([nn.Linear(in_dim, width, dtype=dtype)])
        self.blocks = nn.ModuleList(
            ResidualBlock(width, width, self.activation, dtype) for _ in range(depth)
        )
        self.output_layer = nn.Linear(width, out_dim, dtype=dtype)

    @property
    def widths(self) -> list[int]:
        """Width of the residual stream."""
        return [self.hidden_layers[0].out_features]

    def features(self, x: torch.Tensor, upto: int) -> torch.Tensor:
        """Input of hidden layer ``upto`` (0: ``x``; 1: the residual stream output)."""
        if upto == 0:
            return x
        h = self.activation(self.hidden_layers[0](x))
        for block in self.blocks:
            h = block(h)
        return h

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Evaluate at points ``x`` of shape ``(n, in_dim)``."""
        return self.output_layer(self.features(x, 1))


def expand_width(module: nn.Module, layer: int, W: np.ndarray, beta: np.ndarray) -> None:
    """Add neurons ``(W, beta)`` to hidden layer ``layer`` with zero outgoing weights (in place).

    The module must follow the growth protocol of this module (see the module docstring).
    """
    old = module.hidden_layers[layer]
    k = W.shape[0]
    dtype = old.weight.dtype
    new = nn.Linear(old.in_features, old.out_features + k, dtype=dtype)
    nxt_old = (module.hidden_layers[layer + 1] if layer + 1 < len(module.hidden_layers)
               else module.output_layer)
    nxt = nn.Linear(nxt_old.in_features + k, nxt_old.out_features, dtype=dtype,
                    bias=nxt_old.bias is not None)
    with torch.no_grad():
        new.weight[: old.out_features] = old.weight
        new.bias[: old.out_features] = old.bias
        new.weight[old.out_features :] = torch.from_numpy(W)
        new.bias[old.out_features :] = torch.from_numpy(beta)
        nxt.weight.zero_()
        nxt.weight[:, : nxt_old.in_features] = nxt_old.weight
        if nxt_old.bias is not None:
            nxt.bias.copy_(nxt_old.bias)
    module.hidden_layers[layer] = new
    if layer + 1 < len(module.hidden_layers):
        module.hidden_layers[layer + 1] = nxt
        return
    module.output_layer = nxt
    # residual blocks after the last hidden layer: new stream components pass through
    for block in getattr(module, "blocks", []):
        inner, outer = block.inner, block.outer
        new_inner = nn.Linear(inner.in_features + k, inner.out_features, dtype=dtype)
        new_outer = nn.Linear(outer.in_features, outer.out_features + k, bias=False, dtype=dtype)
        with torch.no_grad():
            new_inner.weight.zero_()
            new_inner.weight[:, : inner.in_features] = inner.weight
            new_inner.bias.copy_(inner.bias)
            new_outer.weight.zero_()
            new_outer.weight[: outer.out_features] = outer.weight
        block.inner, block.outer = new_inner, new_outer


def expand_depth(module: nn.Module, W: np.ndarray, beta: np.ndarray) -> None:
    """Append an identity-initialized residual block ``h + V s(W h + beta)``, ``V = 0``.

    ``W`` has shape ``(k, d)`` with ``d`` the width of the output layer's input.
    """
    if not hasattr(module, "blocks"):
        raise TypeError(f"{type(module).__name__} has no 'blocks' list: depth growth unsupported")
    dim = module.output_layer.in_features
    k = W.shape[0]
    if W.shape != (k, dim):
        raise ValueError(f"W must have shape (k, {dim}), got {W.shape}")
    dtype = module.output_layer.weight.dtype
    block = ResidualBlock(dim, k, module.activation, dtype)
    with torch.no_grad():
        block.inner.weight.copy_(torch.from_numpy(W))
        block.inner.bias.copy_(torch.from_numpy(beta))
        block.outer.weight.zero_()
    module.blocks.append(block)
