"""Device memory of compiled programs, and the longest sequence that fits.

Everything here compiles, nothing runs: :func:`memory_fits` reads XLA's memory analysis of
``jax.jit(fn).lower(*args).compile()`` for ``ShapeDtypeStruct`` arguments, so a length far
beyond the device's memory costs a compilation, not an allocation. :func:`search_maxlen`
doubles, then bisects, over such a test. Used by the ``sp`` and ``scaling`` benchmarks and by
``attnlab demo``'s memory table.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import jax


def temp_memory_bytes(fn: Callable[..., Any], *args: Any) -> int | None:
    """XLA's temporary buffer size for ``jax.jit(fn)(*args)``, from the compiled executable.

    ``args`` may be ``jax.ShapeDtypeStruct``s, so nothing is allocated. Returns None where the
    backend gives no memory analysis.
    """
    analysis = jax.jit(fn).lower(*args).compile().memory_analysis()
    if analysis is None:
        return None
    return int(analysis.temp_size_in_bytes)


def memory_info(compiled: jax.stages.Compiled) -> dict[str, Any]:
    """Per-device bytes of a compiled program: arguments + outputs + temporaries - aliases."""
    ma = compiled.memory_analysis()
    if ma is None:
        return {"memory_analysis": None}
    total = int(
        ma.argument_size_in_bytes + ma.output_size_in_bytes + ma.temp_size_in_bytes
        - getattr(ma, "alias_size_in_bytes", 0)
    )
    return {"bytes_per_device": total, "temp_bytes": int(ma.temp_size_in_bytes)}


def memory_fits(fn: Callable, args: Sequence[Any], limit: int | None) -> tuple[bool, dict]:
    """Compiles fn(*args) (ShapeDtypeStructs) and compares its memory with ``limit``."""
    try:
        compiled = jax.jit(fn).lower(*args).compile()
    except Exception as e:  # noqa: BLE001 - compile-time OOM is an answer, not a crash
        return False, {"compile_error": str(e).splitlines()[0][:200]}
    info = memory_info(compiled)
    total = info.get("bytes_per_device")
    return (limit is None or total is None or total <= limit), info


def device_memory_limit() -> int | None:
    """The first device's memory limit in bytes (None where it reports none: CPU)."""
    try:
        stats = jax.devices()[0].memory_stats() or {}
    except Exception:  # noqa: BLE001 - CPU has none
        return None
    return stats.get("bytes_limit")


def search_maxlen(
    fits: Callable[[int], tuple[bool, dict]],
    *,
    start: int,
    cap: int,
    granularity: int | None,
    log: Callable[[str], None],
    label: str = "",
    floor: int | None = None,
    stop: Callable[[], bool] | None = None,
) -> tuple[int | None, list[dict], bool]:
    """The longest S with ``fits(S)`` true: doubling from ``start`` until it does not fit (or
    passes ``cap``), then bisection to ``granularity`` (None: doubling only).

    With ``floor``, a ``start`` that does not fit is halved until it fits or drops below
    ``floor``. ``stop()``, asked before every attempt, ends the search early (a time budget).
    Every attempt is logged through ``log``.

    Returns:
      (best S or None, every attempt as {"s", "fits", **info}, whether the search finished).
    """
    tried: list[dict] = []

    def attempt(s):
        ok, info = fits(s)
        tried.append({"s": s, "fits": ok, **info})
        log(f"maxlen {label} S={s}: {'fits' if ok else 'does not fit'} {info}")
        return ok

    def halted():
        return stop is not None and stop()

    s, best, bad = start, None, None
    while s <= cap:
        if halted():
            return best, tried, False
        if not attempt(s):
            bad = s
            break
        best, s = s, s * 2
    while best is None and floor is not None and bad is not None and bad // 2 >= floor:
        if halted():
            return best, tried, False
        s = bad // 2
        if attempt(s):
            best = s
        else:
            bad = s
    g = granularity
    while g and best is not None and bad is not None and bad - best > g:
        mid = (best + bad) // 2 // g * g
        if mid <= best:
            break
        if halted():
            return best, tried, False
        if attempt(mid):
            best = mid
        else:
            bad = mid
    return best, tried, True
