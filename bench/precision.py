"""Does a bfloat16 encoder change the ETM's ARI curves? fp32 vs bf16 over seeds.

    python bench/precision.py [--seeds 0 1 2 3 4] [--niter 1000] [--out curves.npz]

Trains the assignment's ETM (K=16, hidden 256, rho 256, relu, dropout 0.5, Adam 1e-3) per seed
in both precisions, scoring theta every iteration with the assignment's clustering, and
prints per precision the mean +- sd over seeds of: the final ARI, the mean ARI over the last
half, the best ARI, and the final NELBO; plus a two-sided Mann-Whitney U test per statistic.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
if __name__ == "__main__":  # no progress bars (tqdm reads this when imported)
    os.environ.setdefault("TQDM_DISABLE", "1")

import numpy as np  # noqa: E402
import torch  # noqa: E402
from scipy.stats import mannwhitneyu  # noqa: E402

import comp565_A4  # noqa: E402
from cellembed.cli import quiet_known_warnings  # noqa: E402
from cellembed.evaluation.scoring import ARIScorer, split_cores  # noqa: E402
from cellembed.training import seed_everything  # noqa: E402


def curve(adata, counts, normalized, seed, bf16, niter, scorer):
    seed_everything(seed)
    model = comp565_A4.build_etm(adata.n_vars)
    model.set_encoder_bf16(bf16)
    _, perf = comp565_A4.train_scETM(model, counts, normalized, adata, niter, scorer)
    return perf


def stats(perf):
    half = len(perf) // 2
    return {"final ARI": perf[-1, 2], "mean ARI, last half": perf[half:, 2].mean(),
            "best ARI": perf[:, 2].max(), "final NELBO": perf[-1, 1]}


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data-dir", default=os.environ.get("COMP565_DATA_DIR", str(ROOT / "data")))
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4])
    parser.add_argument("--niter", type=int, default=1000)
    parser.add_argument("--out", help="save the curves (npz)")
    args = parser.parse_args(argv)
    quiet_known_warnings("precision.py")
    adata = comp565_A4.load_data(args.data_dir)
    counts, normalized = comp565_A4.normalized_counts(adata)
    jobs, _, threads = split_cores()  # the script's ETM split
    torch.set_num_threads(threads)
    results = {False: [], True: []}
    curves = {}
    for seed in args.seeds:
        for bf16 in (False, True):
            with ARIScorer(adata.obs["Celltype"].to_numpy(), seed=seed, n_workers=jobs) as scorer:
                perf = curve(adata, counts, normalized, seed, bf16, args.niter, scorer)
            curves[f"{'bf16' if bf16 else 'fp32'}_seed{seed}"] = perf
            results[bf16].append(stats(perf))
            print(f"seed {seed} {'bf16' if bf16 else 'fp32'}: "
                  + ", ".join(f"{k} {v:.3f}" for k, v in results[bf16][-1].items()), flush=True)
    print(f"\n{'statistic':<22}{'fp32':>18}{'bf16':>18}{'Mann-Whitney p':>17}")
    for key in results[False][0]:
        a = np.array([r[key] for r in results[False]])
        b = np.array([r[key] for r in results[True]])
        p = mannwhitneyu(a, b).pvalue if len(a) > 1 else float("nan")
        print(f"{key:<22}{a.mean():>10.3f} +- {a.std(ddof=1) if len(a) > 1 else 0:.3f}"
              f"{b.mean():>10.3f} +- {b.std(ddof=1) if len(b) > 1 else 0:.3f}{p:>17.2f}")
    if args.out:
        np.savez(args.out, **curves)


if __name__ == "__main__":
    main()
