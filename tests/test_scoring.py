"""cellembed.evaluation.scoring: worker processes give the same ARIs as scoring in this process."""

import numpy as np
import pytest

from cellembed.evaluation import clustering
from cellembed.evaluation.scoring import ARIScorer, split_cores


def blobs(n_per=50, n_types=4, dim=8, spread=0.3, seed=0):
    rng = np.random.default_rng(seed)
    labels = np.repeat(np.arange(n_types), n_per)
    return rng.normal(size=(n_types, dim))[labels] * 3 + spread * rng.normal(size=(labels.size, dim)), labels


def test_worker_processes_give_the_same_aris_as_in_process():
    embeds = [blobs(seed=s, spread=s * 0.5)[0] for s in range(4)]
    truth = blobs()[1]
    with ARIScorer(truth, seed=0, n_workers=2) as scorer:
        for i, e in enumerate(embeds):
            scorer.submit(("t", i), e)
        got = scorer.collect([("t", i) for i in range(4)])
    expected = [clustering.louvain_ari(e, truth) for e in embeds]
    np.testing.assert_allclose(got, expected)
    assert got[0] == pytest.approx(1.0)


def test_worker_errors_reach_the_caller():
    with ARIScorer(np.zeros(10), n_workers=1) as scorer:
        scorer.submit("bad", np.full((10, 2), np.nan))
        with pytest.raises(RuntimeError, match="scoring bad failed in a worker: FloatingPointError"):
            scorer.collect(["bad"])


def test_scorer_reports_its_counts():
    embed, truth = blobs()
    for workers in (0, 1):
        scorer = ARIScorer(truth, n_workers=workers)
        for i in range(3):
            scorer.submit(i, embed)
        scorer.collect(range(3))
        scorer.close()
        assert scorer.stats() == {"scored": 3}, workers


def test_split_cores_gives_workers_every_core_and_the_etm_every_thread():
    assert split_cores(1) == (1, 1, 1)
    assert split_cores(2) == (2, 1, 2)
    assert split_cores(16) == (16, 4, 16)
