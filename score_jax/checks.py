"""Field-check primitives: a Check is (predicate, requirement), the requirement completing
"config.<field>=<value> must be <requirement>"; `require` raises the one-line ConfigError."""

import math
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from score_jax.errors import ConfigError

Check = tuple[Callable[[Any], bool], str]


def require(ok: bool, message: str) -> None:
    """Raises ConfigError(message) unless `ok`."""
    if not ok:
        raise ConfigError(message)


def is_int(v: Any) -> bool:
    return isinstance(v, int | np.integer) and not isinstance(v, bool)


def is_real(v: Any) -> bool:
    return isinstance(v, int | float | np.number) and not isinstance(v, bool) and math.isfinite(v)


def integer(lo: int, *, or_value: int | None = None) -> Check:
    """An integer >= lo (or exactly `or_value`)."""
    text = f"an integer >= {lo}" + ("" if or_value is None else f" (or {or_value})")
    return (lambda v: is_int(v) and (v >= lo or v == or_value)), text


def real(lo: float, hi: float = math.inf, *, lo_open=False, hi_open=False, none=False) -> Check:
    """A finite number in [lo, hi] (each end open when asked); `none`: None is accepted too."""

    def ok(v: Any) -> bool:
        if v is None:
            return none
        if not is_real(v):
            return False
        return (v > lo if lo_open else v >= lo) and (v < hi if hi_open else v <= hi)

    interval = f"{'(' if lo_open else '['}{lo:g}, {hi:g}{')' if hi_open or hi == math.inf else ']'}"
    return ok, f"a finite number in {interval}" + (" or None" if none else "")


def choice(options: Sequence[str]) -> Check:
    """One of `options`."""
    options = tuple(options)
    return (lambda v: isinstance(v, str) and v in options), f"one of {options}"


BOOL: Check = (lambda v: isinstance(v, bool), "True or False")
STRING: Check = (lambda v: isinstance(v, str), "a string")
PROB: Check = real(0.0, 1.0, hi_open=True)  # [0, 1)
FRACTION: Check = real(0.0, 1.0)  # [0, 1]
