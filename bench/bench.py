"""Speed of the assignment: per-iteration cost of every stage, the whole run, and scaling.

    python bench/bench.py                      # per-iteration table + whole default runs (fp32, and bf16 where native)
    python bench/bench.py --no-full-run        # per-iteration table only (~2 minutes)
    python bench/bench.py --scaling            # also NMF / ETM / ARI cost at 2k-100k cells

Every stage is timed on the real data for (a) a straightforward reference implementation
(bench/reference.py: dense numpy, scanpy's evaluate_ari, the course's ETM step), (b)
scikit-learn's multiplicative-update NMF where it applies, (c) this project; each figure is
the median over repeats, in milliseconds per iteration. The reference's whole run is
estimated as the sum of its per-iteration costs times the assignment's iteration counts (plus
its t-SNE); ours is measured by running ``comp565_A4.py`` end to end.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
if __name__ == "__main__":  # no bars in the timings (tqdm reads this when imported)
    os.environ.setdefault("TQDM_DISABLE", "1")
# scanpy imports the louvain package, which warns about its own dependencies when imported
warnings.filterwarnings("ignore", message="pkg_resources is deprecated")

import numpy as np  # noqa: E402
import scanpy as sc  # noqa: E402
import torch  # noqa: E402
from sklearn.decomposition import NMF  # noqa: E402
from threadpoolctl import threadpool_limits  # noqa: E402

import comp565_A4  # noqa: E402
from cellembed.evaluation import clustering  # noqa: E402
from cellembed.cli import quiet_known_warnings  # noqa: E402
from cellembed.runtime import native_bf16  # noqa: E402
from cellembed.evaluation.scoring import NoScorer, available_cores  # noqa: E402
from bench import reference  # noqa: E402
from bench.timing import median_ms  # noqa: E402

COUNTS = {"nmf_sse": 100, "nmf_psn": 1000, "etm": 1000, "ari": 2200}  # the default run's work


class Stepper:
    """Calls ``step(state) -> state`` so that each timed call advances one iteration."""

    def __init__(self, step, state):
        self.step, self.state = step, state

    def __call__(self):
        self.state = self.step(*self.state)


def bench_nmf(adata, repeat):
    X_sparse = adata.X.T.tocsr().astype(np.float64)  # (M, N)
    X = X_sparse.toarray()
    M, N = X.shape
    W0, H0 = comp565_A4.init_factors(M, N, seed=0)
    rows = {}

    def ours(fn):
        # whole runs of `repeat` iterations (per-call setup included), per iteration
        def run():
            fn(X_sparse, W0, H0, adata, niter=repeat, scorer=NoScorer())
        return median_ms(run, 3) / repeat

    def sklearn(beta_loss, data):
        # one MU iteration per fit from the current factors (tol=0: no early stop)
        state = [W0.copy(), H0.copy()]

        def call():
            model = NMF(16, init="custom", solver="mu", beta_loss=beta_loss, max_iter=1, tol=0)
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # "maximum iterations reached"
                state[0] = model.fit_transform(data, W=state[0], H=state[1])
            state[1] = model.components_
        return call

    sse_trace = Stepper(lambda W, H, _=None: reference.nmf_sse_step(X, W, H)[:2], (W0, H0))
    sse_resid = Stepper(lambda W, H, _=None: reference.nmf_sse_step_residual(X, W, H)[:2], (W0, H0))
    psn_ref = Stepper(lambda W, H, _=None: reference.nmf_psn_step(X, W, H)[:2], (W0, H0))
    rows["nmf_sse"] = {
        "reference": median_ms(sse_trace, max(3, repeat // 5)),
        "reference (dense residual)": median_ms(sse_resid, repeat),
        "scikit-learn": median_ms(sklearn("frobenius", X), repeat),
        "ours": ours(comp565_A4.nmf_sse),
    }
    rows["nmf_psn"] = {
        "reference": median_ms(psn_ref, repeat),
        "scikit-learn": median_ms(sklearn("kullback-leibler", X), repeat),
        "ours": ours(comp565_A4.nmf_psn),
    }
    return rows


def bench_etm(adata, repeat):
    counts, normalized = comp565_A4.normalized_counts(adata)
    dense = counts.dense()
    ref, ref_optimizer = reference.course_etm(adata.n_vars)
    out = {"reference": median_ms(lambda: reference.etm_step(ref, ref_optimizer, dense, normalized), repeat)}
    for bf16 in (False, True):
        torch.manual_seed(0)
        model = comp565_A4.build_etm(adata.n_vars)
        model.set_encoder_bf16(bf16)

        def step():
            comp565_A4.train_scETM_helper(model, counts, normalized)
            comp565_A4.get_theta(model, normalized)
        out["ours, bf16" if bf16 else "ours"] = median_ms(step, repeat)
    return out


def bench_ari(adata, repeat):
    """evaluate_ari on successive NMF embeddings: scanpy vs ours, and each phase alone.

    One core (BLAS and numba threads limited to 1, as in a scoring worker). Phases, ms per
    call: our kNN vs the KD-tree it replaced and scikit-learn's brute force (scanpy's),
    the connectivity pattern, our Louvain vs the louvain package on the same graph (the
    package's igraph graph built outside the timing), the ARI.
    """
    import igraph as ig
    import numba
    from scipy.spatial import cKDTree
    from sklearn.neighbors import NearestNeighbors

    with warnings.catch_warnings():  # the package warns about pkg_resources and leidenalg
        warnings.simplefilter("ignore")
        import louvain
    X = adata.X.T.tocsr().astype(np.float64)
    rng = np.random.default_rng(1)
    W, H = rng.random((adata.n_vars, 16)), rng.random((16, adata.n_obs))
    embeds = []
    for _ in range(repeat + 1):  # distinct embeddings, as training produces them
        W, H, _ = comp565_A4.nmf_psn(X, W, H, adata, niter=3, scorer=NoScorer())
        embeds.append(H.T.copy())
    ref_adata = reference.anndata_for(adata)
    truth = adata.obs["Celltype"].to_numpy()
    out = {}
    threads = numba.get_num_threads()
    numba.set_num_threads(1)
    try:
        with threadpool_limits(1):
            it = iter(embeds * 3)
            out["reference"] = median_ms(lambda: reference.evaluate_ari(next(it), ref_adata), repeat)
            it = iter(embeds * 3)
            out["ours"] = median_ms(lambda: clustering.louvain_ari(next(it), truth), repeat)
            phase = {k: [] for k in ("knn", "knn KD-tree (before)", "knn sklearn brute (scanpy)",
                                     "pattern", "louvain", "louvain package", "ari")}
            k_query = clustering.N_NEIGHBORS + 1
            for embed in embeds:  # interleaved, so load changes hit both sides alike
                t0 = time.perf_counter()
                clustering.knn(embed)
                t1 = time.perf_counter()
                cKDTree(embed, leafsize=32).query(embed, k=k_query)
                t2 = time.perf_counter()
                NearestNeighbors(n_neighbors=k_query, algorithm="brute").fit(embed).kneighbors(embed)
                t3 = time.perf_counter()
                pattern = clustering.knn_graph_pattern(embed)  # includes its own kNN: subtract
                t4 = time.perf_counter()
                labels = clustering.louvain_partition(pattern)
                t5 = time.perf_counter()
                sources, targets = pattern.nonzero()
                graph = ig.Graph(n=pattern.shape[0], edges=list(zip(sources.tolist(), targets.tolist())),
                                 directed=True)
                t6 = time.perf_counter()
                louvain.find_partition(graph, louvain.RBConfigurationVertexPartition, seed=0,
                                       resolution_parameter=clustering.RESOLUTION)
                t7 = time.perf_counter()
                clustering.adjusted_rand_score(truth, labels)
                t8 = time.perf_counter()
                phase["knn"].append(t1 - t0)
                phase["knn KD-tree (before)"].append(t2 - t1)
                phase["knn sklearn brute (scanpy)"].append(t3 - t2)
                phase["pattern"].append(max(0.0, (t4 - t3) - (t1 - t0)))
                phase["louvain"].append(t5 - t4)
                phase["louvain package"].append(t7 - t6)
                phase["ari"].append(t8 - t7)
    finally:
        numba.set_num_threads(threads)
    out["ours: phases (ms)"] = {k: float(np.median(v) * 1e3) for k, v in phase.items()}
    return out


def bench_tsne(adata):
    embed = np.random.default_rng(0).dirichlet(np.ones(16), size=adata.n_obs).astype(np.float32)
    tmp = reference.anndata_for(adata)
    tmp.obsm["X_e"] = embed
    t0 = time.perf_counter()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        sc.tl.tsne(tmp, use_rep="X_e", random_state=0, n_jobs=torch.get_num_threads())
    return (time.perf_counter() - t0) * 1e3


def cpu_name():
    """The CPU's model name and whether it multiplies bfloat16 natively."""
    try:
        lines = Path("/proc/cpuinfo").read_text().splitlines()
        name = next(line.split(":", 1)[1].strip() for line in lines if line.startswith("model name"))
    except (OSError, StopIteration):  # not Linux
        import platform

        name = platform.processor() or "unknown CPU"
    kind = "with" if native_bf16(torch.device("cpu")) else "without"
    return f"{name}, {available_cores()} cores, {kind} native bf16"


def full_run(data_dir, extra=()):
    """Run comp565_A4.py end to end; wall seconds, CPU seconds and its summary.json."""
    with tempfile.TemporaryDirectory() as out:
        cmd = [sys.executable, str(ROOT / "comp565_A4.py"), "--data-dir", str(data_dir), "--figures-dir", out, *extra]
        before = os.times()
        t0 = time.perf_counter()
        subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, cwd=ROOT)
        wall = time.perf_counter() - t0
        after = os.times()
        cpu = (after.children_user - before.children_user) + (after.children_system - before.children_system)
        summary = json.loads((Path(out) / "summary.json").read_text())
    return {"wall_s": wall, "cpu_s": cpu, "summary": summary, "command": " ".join(cmd[1:])}


def print_table(rows, whole):
    def fmt(v):
        return f"{v:9.1f}" if isinstance(v, float) else f"{'-':>9}"

    print(f"\nPer iteration, ms (median); {available_cores()} cores, training threads {torch.get_num_threads()}")
    print(f"{'stage':<34}{'reference':>11}{'sklearn':>11}{'ours':>11}{'ours bf16':>11}{'ref/ours':>10}")
    for name, r in rows.items():
        best = r.get("ours, bf16", r["ours"]) if name == "etm" else r["ours"]
        print(f"{name:<34}{fmt(r['reference']):>11}{fmt(r.get('scikit-learn')):>11}{fmt(r['ours']):>11}"
              f"{fmt(r.get('ours, bf16')):>11}{r['reference'] / r['ours']:>9.1f}x")
        if "reference (dense residual)" in r:
            print(f"{'  (reference with dense residual)':<34}{fmt(r['reference (dense residual)']):>11}")
        if best is not r["ours"]:
            print(f"{'  (ref / ours bf16)':<34}{'':>44}{r['reference'] / best:>9.1f}x")
    phases = rows["evaluate_ari"].get("ours: phases (ms)")
    if phases:
        print("evaluate_ari, ours, by phase (ms): " + ", ".join(f"{k} {v:.1f}" for k, v in phases.items()))
    if whole:
        print("\nWhole default run (seconds)")
        for k, v in whole.items():
            print(f"  {k}: {v}")


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data-dir", default=os.environ.get("COMP565_DATA_DIR", str(ROOT / "data")))
    parser.add_argument("--repeat", type=int, default=10, help="timed iterations per stage")
    parser.add_argument("--no-full-run", action="store_true", help="skip the end-to-end run of comp565_A4.py")
    parser.add_argument("--full-run-args", default="",
                        help="extra flags for the end-to-end runs (one per precision the CPU has), e.g. '--jobs 1'")
    parser.add_argument("--scaling", action="store_true", help="also time 2k-100k cells (bench/scaling.py)")
    parser.add_argument("--json", help="also write the numbers to this JSON file")
    args = parser.parse_args(argv)
    quiet_known_warnings("bench.py")
    sc.settings.verbosity = 0
    adata = comp565_A4.load_data(args.data_dir)

    # the reference runs as a submission would: all cores, one process
    torch.set_num_threads(available_cores())
    rows = {}
    rows.update(bench_nmf(adata, args.repeat))
    rows["etm"] = bench_etm(adata, args.repeat)
    rows["evaluate_ari"] = bench_ari(adata, args.repeat)
    tsne_ms = bench_tsne(adata)

    reference_total = sum(rows[k]["reference"] * COUNTS[k] for k in ("nmf_sse", "nmf_psn", "etm")) / 1e3
    reference_total += rows["evaluate_ari"]["reference"] * COUNTS["ari"] / 1e3 + 2 * tsne_ms / 1e3
    whole = {"CPU": cpu_name(), "reference, estimated from the per-iteration costs": round(reference_total, 1)}
    if not args.no_full_run:
        # every precision this CPU runs natively: fp32 always, bf16 where the CPU has it
        precisions = ["fp32", "bf16"] if native_bf16(torch.device("cpu")) else ["fp32"]
        for precision in precisions:
            run = full_run(args.data_dir, ["--precision", precision, *args.full_run_args.split()])
            whole[f"ours ({precision}), measured: wall"] = round(run["wall_s"], 1)
            whole[f"ours ({precision}), measured: CPU (user+sys)"] = round(run["cpu_s"], 1)
            whole[f"ours ({precision}): stages (wall s)"] = run["summary"]["wall_seconds"]
            whole[f"ours ({precision}): scoring"] = run["summary"].get("ari_scoring")
            whole[f"ours ({precision}): final ARI"] = {k: round(v, 3) for k, v in run["summary"]["final_ari"].items()}
            whole[f"reference / ours ({precision})"] = f"{reference_total / run['wall_s']:.1f}x"
            whole[f"command ({precision})"] = run["command"]
    print_table(rows, whole)
    if args.scaling:
        from bench import scaling

        scaling.main(["--stages", "--data-dir", args.data_dir])
    if args.json:
        Path(args.json).write_text(json.dumps({"per_iteration_ms": rows, "tsne_ms": tsne_ms, "whole": whole},
                                              indent=2, default=str))


if __name__ == "__main__":
    main()
