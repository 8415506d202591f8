"""Checks of static arguments (block sizes, counts, scalars) shared by configs, kernels and ops.

Static means known when a function is traced: Python ints and floats (NumPy scalars and
concrete 0-d arrays accepted), never traced arrays. Each check returns a plain Python int or
float, so a config stays hashable and compares equal whatever integer type it was given.
"""

from __future__ import annotations

import math
from typing import Any

import jax
import numpy as np


def is_int(x: Any) -> bool:
    """True for a Python or NumPy integer (not a bool)."""
    return isinstance(x, (int, np.integer)) and not isinstance(x, (bool, np.bool_))


def check_int(
    name: str, value: Any, *, minimum: int = 1, maximum: int | None = None,
    power_of_two: bool = False, multiple_of: int | None = None, why: str | None = None,
) -> int:
    """``value`` as a Python int, or ValueError naming ``name``, the value and the rule.

    Args:
      name: the argument's name as the caller knows it (e.g. ``"block_kv"``).
      minimum, maximum: the allowed range (inclusive; ``maximum`` None: unbounded).
      power_of_two: the value must be a power of two.
      multiple_of: the value must be a multiple of this.
      why: the reason for the rule, shown in parentheses (e.g. "the TPU sublane count").

    Example:
      >>> check_int("block_kv", np.int64(64), minimum=16, power_of_two=True)
      64
    """
    rule = _int_rule(minimum, maximum, power_of_two, multiple_of)
    reason = f" ({why})" if why else ""
    if not is_int(value):
        raise ValueError(
            f"{name} must be {rule}{reason}, got {value!r} of type {type(value).__name__}"
        )
    v = int(value)
    bad_pow2 = power_of_two and (v <= 0 or v & (v - 1))
    bad_multiple = multiple_of is not None and v % multiple_of
    if v < minimum or (maximum is not None and v > maximum) or bad_pow2 or bad_multiple:
        hint = ""
        if bad_pow2 and v > 0:
            hint = f"; try {1 << (v.bit_length() - 1)} or {1 << v.bit_length()}"
        elif bad_multiple and v > 0:
            hint = f"; try {-(-v // multiple_of) * multiple_of}"  # type: ignore[operator]
        raise ValueError(f"{name} must be {rule}{reason}, got {v}{hint}")
    return v


def _int_rule(minimum: int, maximum: int | None, power_of_two: bool,
              multiple_of: int | None) -> str:
    if multiple_of is not None:
        kind = f"a multiple of {multiple_of}"
        return f"{kind} >= {minimum}" if minimum > multiple_of else f"a positive {kind[2:]}"
    kind = "a power of two" if power_of_two else "an int"
    if maximum is not None:
        return f"{kind} in [{minimum}, {maximum}]"
    if minimum == 1 and not power_of_two:
        return "a positive int"
    return f"{kind} >= {minimum}"


def check_static_float(
    name: str, value: Any, *, positive: bool = False, minimum: float | None = None,
    maximum: float | None = None,
) -> float:
    """``value`` as a finite Python float, or ValueError naming ``name`` and the value.

    A traced array (an argument of a ``jax.jit``-ed function) is refused: the ops need the
    value while tracing, to pick kernels and fold it into them.

    Args:
      positive: the value must be > 0.
      minimum, maximum: an inclusive range (None: unbounded).
    """
    if isinstance(value, jax.core.Tracer):
        raise ValueError(
            f"{name} must be a static Python float, got a traced {value.dtype} array of shape "
            f"{value.shape}; under "
            "jax.jit pass it as a static argument (static_argnames, functools.partial) or "
            "close over it"
        )
    if isinstance(value, (bool, np.bool_, str, bytes)) or np.ndim(value) != 0:
        raise ValueError(f"{name} must be a float, got {value!r}")
    try:
        dtype = np.asarray(value).dtype
    except (TypeError, ValueError):
        dtype = np.dtype(object)
    if not (np.issubdtype(dtype, np.integer) or np.issubdtype(dtype, np.floating)):
        raise ValueError(f"{name} must be a float, got {value!r} of type {type(value).__name__}")
    f = float(value)
    if not math.isfinite(f):
        raise ValueError(f"{name} must be a finite float, got {f}")
    if positive and not f > 0:
        raise ValueError(f"{name} must be positive, got {f}")
    if (minimum is not None and f < minimum) or (maximum is not None and f > maximum):
        if maximum is None:
            rule = f"be >= {minimum}"
        elif minimum is None:
            rule = f"be <= {maximum}"
        else:
            rule = f"lie in [{minimum}, {maximum}]"
        raise ValueError(f"{name} must {rule}, got {f}")
    return f


def check_bool(name: str, value: Any) -> bool:
    """``value`` as a Python bool (NumPy bools accepted), or ValueError naming ``name``: a flag
    that picks what is computed cannot be a traced value, a string or a number."""
    if not isinstance(value, (bool, np.bool_)):
        raise ValueError(
            f"{name} must be a bool, got {value!r} of type {type(value).__name__}"
        )
    return bool(value)


def check_type(name: str, value: Any, types: type | tuple[type, ...], what: str, *,
               allow_none: bool = False) -> Any:
    """``value`` itself if it is an instance of ``types`` (or None with ``allow_none``), else
    ``ValueError(f"{name} must be {what}, got {value!r}")``: ``what`` says what was expected
    in words (with its "or None" where None is allowed)."""
    if not (isinstance(value, types) or (allow_none and value is None)):
        raise ValueError(f"{name} must be {what}, got {value!r}")
    return value


__all__ = ["check_bool", "check_int", "check_static_float", "check_type", "is_int"]
