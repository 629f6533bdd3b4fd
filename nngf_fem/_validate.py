"""Argument checks shared by the package: integers and real numbers with clear messages.

Python and numpy scalars are accepted alike (``3``, ``np.int64(3)``, ``np.float32(0.5)``,
0-d numpy arrays and 0-d torch tensors), booleans and non-numbers are refused. Every
message reads ``"<name> must be <what>, got <value!r>"``, so that it names the
argument and the offending value. The checks are local: call them with values that
are the same on all ranks (arguments), or combine them with
:func:`nngf_fem.mpi.raise_on_any` for values that may differ between ranks.
"""

import math
import numbers
import operator
from typing import Any

import numpy as np

__all__ = ["ArgumentTypeError", "as_int", "as_real"]


class ArgumentTypeError(TypeError, ValueError):
    """An argument of the wrong type (a ``TypeError`` that is also a ``ValueError``).

    Both bases: ``except TypeError`` (Python's convention for a wrong type) and
    ``except ValueError`` (what the package raised before for bad arguments) catch it.
    """


def _is_bool(value: Any) -> bool:
    if isinstance(value, bool | np.bool_):
        return True
    dtype = getattr(value, "dtype", None)
    return dtype is not None and getattr(value, "ndim", None) == 0 and (
        str(dtype) in ("bool", "torch.bool"))


def _bounds(minimum: float | None, maximum: float | None) -> str:
    if minimum is not None and maximum is not None:
        return f" in [{minimum}, {maximum}]"
    if minimum is not None:
        return f" >= {minimum}"
    if maximum is not None:
        return f" <= {maximum}"
    return ""


def as_int(name: str, value: Any, minimum: int | None = None,
           maximum: int | None = None) -> int:
    """``value`` as a Python ``int``, checked.

    Args:
        name: the argument's name, used in the message (e.g. ``"width"``).
        value: an ``int``, a numpy integer, or a 0-d integer array/tensor (not a bool,
            not a float, even an integral one such as ``4.0``).
        minimum: smallest allowed value (inclusive), or None.
        maximum: largest allowed value (inclusive), or None.

    Returns:
        The value as a Python ``int``.

    Raises:
        ArgumentTypeError: ``value`` is not an integer (e.g. ``True``, ``4.0``, ``"4"``);
            a ``TypeError`` and a ``ValueError``.
        ValueError: ``value`` is outside ``[minimum, maximum]``.
    """
    what = f"an integer{_bounds(minimum, maximum)}"
    if _is_bool(value) or isinstance(value, str | bytes):
        raise ArgumentTypeError(f"{name} must be {what}, got {value!r}")
    try:
        result = operator.index(value)  # int, np.integer, 0-d integer arrays/tensors
    except TypeError:
        raise ArgumentTypeError(f"{name} must be {what}, got {value!r}") from None
    if (minimum is not None and result < minimum) or (maximum is not None and result > maximum):
        raise ValueError(f"{name} must be {what}, got {value!r}")
    return int(result)


def as_real(name: str, value: Any, minimum: float | None = None, maximum: float | None = None,
            *, finite: bool = True, positive: bool = False) -> float:
    """``value`` as a Python ``float``, checked.

    Args:
        name: the argument's name, used in the message (e.g. ``"eps"``).
        value: an ``int``/``float``, a numpy integer or floating scalar (``np.float32``
            ...), or a 0-d real array/tensor (not a bool, a string or a complex number).
        minimum: smallest allowed value (inclusive), or None.
        maximum: largest allowed value (inclusive), or None.
        finite: refuse NaN and +-Inf (default). With ``finite=False``, NaN is still
            refused when a bound or ``positive`` is given.
        positive: require ``value > 0``.

    Returns:
        The value as a Python ``float``.

    Raises:
        ArgumentTypeError: ``value`` is not a real number (a ``TypeError`` and a
            ``ValueError``).
        ValueError: ``value`` is not finite, not positive, or outside the bounds.
    """
    parts = ["a finite" if finite else "a", "positive" if positive else "", "real number"]
    what = " ".join(p for p in parts if p) + _bounds(minimum, maximum)
    if _is_bool(value) or isinstance(value, str | bytes | complex | np.complexfloating):
        raise ArgumentTypeError(f"{name} must be {what}, got {value!r}")
    if isinstance(value, numbers.Real):
        result = float(value)
    elif getattr(value, "ndim", None) == 0 and not getattr(value, "is_complex", lambda: False)():
        dtype = getattr(value, "dtype", None)
        if isinstance(dtype, np.dtype) and dtype.kind not in "iuf":
            raise ArgumentTypeError(f"{name} must be {what}, got {value!r}")
        try:
            result = float(value)
        except (TypeError, ValueError):
            raise ArgumentTypeError(f"{name} must be {what}, got {value!r}") from None
    else:
        raise ArgumentTypeError(f"{name} must be {what}, got {value!r}")
    bad = (finite and not math.isfinite(result)) or (positive and not result > 0)
    bad = bad or (minimum is not None and not result >= minimum)
    bad = bad or (maximum is not None and not result <= maximum)
    if bad:
        raise ValueError(f"{name} must be {what}, got {value!r}")
    return result
