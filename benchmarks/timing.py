"""Framework-free timing helpers shared by the benchmarks (the PyTorch side imports no JAX)."""

import os
import resource
import time
from collections.abc import Callable


def loadavg() -> list[float]:
    return [round(v, 2) for v in os.getloadavg()]


def peak_rss_mb() -> float:
    """Peak resident memory of this process, MiB: VmHWM of /proc/self/status (reset by exec, so
    a subprocess reports its own peak), else getrusage's ru_maxrss (KiB on Linux; a child
    inherits its parent's value across fork + exec)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024.0
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def time_calls(
    fn: Callable[[], object], steps: int, warmup: int, cpu: list[float] | None = None
) -> list[float]:
    """Wall seconds of each of `steps` calls of fn (which must block), after `warmup` calls;
    appends each call's CPU seconds (all threads of this process) to `cpu` if given."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(steps):
        c0, t0 = time.process_time(), time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
        if cpu is not None:
            cpu.append(time.process_time() - c0)
    return times
