"""Train registered models on one data set over several seeds and rank them on one leaderboard.

    python compare.py --data pbmc3k --models pca,nmf_psn,etm --seeds 0 1 2
    python compare.py --help

The command of `cellembed.leaderboard` (installed as ``cellembed-compare`` too); see its docstring.
"""

import sys

from cellembed.leaderboard import command, main, parse_args  # noqa: F401 (main, parse_args: the API of this file)

if __name__ == "__main__":  # --help and a bad flag answer at once: the heavy imports come after parsing
    sys.exit(command())
