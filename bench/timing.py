"""Timing helper shared by the benchmarks."""

import time

import numpy as np


def median_ms(fn, repeat, warmup=1):
    """Median wall time of ``fn()`` in milliseconds over ``repeat`` calls after ``warmup``."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1e3)
    return float(np.median(times))
