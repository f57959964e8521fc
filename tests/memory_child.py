"""What the peak-memory tests' child processes share (tests/test_memory.py, test_backed.py,
test_nmf_minibatch.py, test_etm_minibatch.py): each runs a script in a fresh Python process
(``python -c CHILD``, from the repository root) that imports this module as

    sys.path.insert(0, "tests"); from memory_child import mib, reset_peak, synthetic_counts

Linux only: the peak is read from, and reset through, ``/proc/self``.
"""

import gc

import numpy as np
import scipy.sparse as sp


def mib(key):
    """``VmRSS`` (now) or ``VmHWM`` (the peak since the last `reset_peak`) of this process, MiB."""
    for line in open("/proc/self/status"):
        if line.startswith(key + ":"):
            return int(line.split()[1]) / 1024
    raise RuntimeError(f"/proc/self/status has no {key}")


def reset_peak():
    """Collect garbage and make the peak resident memory the current one; returns it (the baseline), MiB."""
    gc.collect()
    with open("/proc/self/clear_refs", "w") as fh:
        fh.write("5")  # the peak RSS becomes the current RSS
    return mib("VmRSS")


def synthetic_counts(n, m, k, seed=0):
    """CSR float32 counts (n, m): ``k`` geometric(0.3) draws per cell at random genes, repeats summed."""
    rng = np.random.default_rng(seed)
    return sp.csr_matrix((rng.geometric(0.3, n * k).astype(np.float32),
                          (np.repeat(np.arange(n, dtype=np.int32), k), rng.integers(0, m, n * k).astype(np.int32))),
                         shape=(n, m), dtype=np.float32)
