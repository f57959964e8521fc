"""Count likelihoods, written once and shared by every model (tests check them against
``torch.distributions``): categorical (the ETMs), Poisson, negative binomial (scVI's mean /
inverse-dispersion form) and zero-inflated negative binomial (DCA / scDeepCluster), plus the
Gaussian KL of a VAE.

Counts come either as a dense ``(N, M)`` tensor or as `CSRCounts`, which keeps only the
non-zero counts: a categorical likelihood ``sum_j x_ij log p_ij`` has no terms where
``x_ij = 0``, so neither do its value and its gradient.
"""

from __future__ import annotations

import numpy as np
import scipy.sparse as sp
import torch

LOG_EPS = 1e-6  # the course ETM's guard inside log(theta @ beta + 1e-6): p can underflow to 0
# Guards log(mu), log(theta) and log(pi) of the count likelihoods: a softplus or exp output can
# underflow to 0 (scVI's and DCA's eps are 1e-8 and 1e-10; 1e-8 keeps float32 finite).
EPS = 1e-8


class CSRCounts:
    """A cells x genes count matrix kept as CSR, with the transposed pattern precomputed.

    Parameters
    ----------
    matrix : scipy.sparse matrix or array-like, shape (N, M)
        Raw counts.
    dtype : torch.dtype
    device : torch.device or str
    """

    def __init__(self, matrix, dtype=torch.float32, device="cpu"):
        csr = sp.csr_matrix(matrix)
        csr.sum_duplicates()
        csr.sort_indices()
        self.scipy = csr
        self.dtype, self.device = dtype, device
        self.shape = csr.shape
        self.nnz = csr.nnz
        self.crow, self.col = _as_long(csr.indptr, device), _as_long(csr.indices, device)
        self._transposed = None  # (t_crow, t_col, t_perm), made on first use (`csr_t`)
        self.values = torch.as_tensor(csr.data, dtype=dtype, device=device)
        self.pattern = torch.sparse_csr_tensor(self.crow, self.col, self.values, size=self.shape,
                                               check_invariants=False)
        self._flat = None  # flat_index(), made on first use

    def rows(self, index):
        """The counts of the cells ``index`` (a minibatch), as a new `CSRCounts`."""
        return CSRCounts(self.scipy[np.asarray(index)], dtype=self.dtype, device=self.device)

    def csr(self, values):
        """A torch CSR tensor (N, M) with this pattern and ``values`` (nnz,)."""
        return torch.sparse_csr_tensor(self.crow, self.col, values, size=self.shape, check_invariants=False)

    def csr_t(self, values):
        """The transpose (M, N) of `csr`, as a CSR tensor."""
        if self._transposed is None:  # only the gradients of a product need it (not the ZINB)
            csr = self.scipy
            csc = csr.tocsc()  # same entries, column-major: the transposed CSR's pattern
            # position in csr.data of every entry of csc.data
            order = sp.csr_matrix(
                (np.arange(csr.nnz, dtype=np.float64), csr.indices, csr.indptr), shape=csr.shape
            ).tocsc()
            self._transposed = tuple(_as_long(a, self.device) for a in (csc.indptr, csc.indices, order.data))
        t_crow, t_col, t_perm = self._transposed
        return torch.sparse_csr_tensor(t_crow, t_col, values[t_perm], size=self.shape[::-1], check_invariants=False)

    def dense(self):
        """The counts as a dense (N, M) tensor."""
        return self.pattern.to_dense()

    def row_sums(self):
        """Total count of every cell, shape (N,)."""
        return torch.segment_reduce(self.values, "sum", offsets=self.crow)

    def flat_index(self):
        """Position of every non-zero in the flattened (N, M) matrix, ``i * M + j``, shape (nnz,)."""
        if self._flat is None:
            rows = torch.repeat_interleave(torch.arange(self.shape[0], device=self.crow.device),
                                           self.crow.diff())
            self._flat = rows * self.shape[1] + self.col
        return self._flat


def _as_long(array, device):
    """An index array as an int64 Tensor on ``device``."""
    return torch.as_tensor(np.asarray(array, dtype=np.int64), device=device)


class _SparseCategoricalNLL(torch.autograd.Function):
    """-(1/N) sum_ij x_ij log((theta beta)_ij + eps), evaluated and differentiated at x != 0.

    Forward: the product theta @ beta is sampled at the non-zeros (SDDMM); backward: with
    g_ij = -x_ij / ((theta beta)_ij + eps) / N on those entries, d/dtheta = G beta^T and
    d/dbeta = theta^T G are sparse-dense products.
    """

    @staticmethod
    def forward(ctx, theta, beta, counts):
        p = torch.sparse.sampled_addmm(counts.pattern, theta, beta, beta=0.0).values()  # (nnz,)
        denom = p + LOG_EPS
        n_cells = theta.shape[0]
        nll = -(counts.values * torch.log(denom)).sum() / n_cells
        ctx.counts = counts
        ctx.save_for_backward(theta, beta, denom)
        return nll

    @staticmethod
    def backward(ctx, grad_out):
        theta, beta, denom = ctx.saved_tensors
        counts = ctx.counts
        g = -(counts.values / denom) * (grad_out / theta.shape[0])  # (nnz,)
        grad_theta = counts.csr(g) @ beta.T if ctx.needs_input_grad[0] else None  # (N, K)
        grad_beta = (counts.csr_t(g) @ theta).T if ctx.needs_input_grad[1] else None  # (K, M)
        return grad_theta, grad_beta, None


def categorical_nll(theta, beta, counts):
    """Mean over cells of -sum_j x_ij log(p_ij + eps), with p = theta @ beta.

    The ETM's reconstruction term: each cell's counts are draws from the categorical
    distribution p_i over genes (the multinomial coefficient is constant and dropped).

    Parameters
    ----------
    theta : Tensor, shape (N, K)
        Topic proportions (rows sum to 1).
    beta : Tensor, shape (K, M)
        Topic-gene probabilities (rows sum to 1).
    counts : Tensor (N, M) or CSRCounts
        Raw counts; `CSRCounts` takes the sparse path, same value and gradient.

    Returns
    -------
    Tensor, scalar
    """
    if isinstance(counts, CSRCounts):
        return _SparseCategoricalNLL.apply(theta, beta, counts)
    return -(torch.log(theta @ beta + LOG_EPS) * counts).sum(1).mean()


class _SparseLogitsNLL(torch.autograd.Function):
    """-(1/N) sum_ij x_ij log softmax(l_i)_j, read only at x != 0.

    With n_i = sum_j x_ij the cell's total, ``-sum_j x_ij log softmax(l_i)_j
    = n_i logsumexp(l_i) - sum_j x_ij l_ij``: the forward needs one logsumexp per row and
    the logits at the non-zeros. Its gradient is ``(n_i softmax(l_i)_j - x_ij) / N``: dense
    from the softmax, minus the counts at the non-zeros.
    """

    @staticmethod
    def forward(ctx, logits, counts):
        lse = torch.logsumexp(logits, dim=1)  # (N,)
        totals = counts.row_sums()  # (N,)
        flat = counts.flat_index()  # (nnz,) positions in the flattened (N, M) matrix
        at_counts = logits.reshape(-1).index_select(0, flat)  # (nnz,)
        nll = ((totals * lse).sum() - (counts.values * at_counts).sum()) / logits.shape[0]
        ctx.counts = counts
        ctx.save_for_backward(logits, lse, totals)
        return nll

    @staticmethod
    def backward(ctx, grad_out):
        logits, lse, totals = ctx.saved_tensors
        counts = ctx.counts
        scale = grad_out / logits.shape[0]
        grad = torch.exp(logits - lse[:, None])  # (N, M) softmax
        grad *= (totals * scale)[:, None]
        grad.view(-1).index_add_(0, counts.flat_index(), counts.values * -scale)
        return grad, None


def categorical_logits_nll(logits, counts):
    """Mean over cells of -sum_j x_ij log softmax(logits_i)_j.

    For decoders that mix topics in logit space (scETM's batch-corrected decoder).

    Parameters
    ----------
    logits : Tensor, shape (N, M)
    counts : Tensor (N, M) or CSRCounts
        `CSRCounts` takes the sparse path (`_SparseLogitsNLL`), same value and gradient.

    Returns
    -------
    Tensor, scalar
    """
    if isinstance(counts, CSRCounts):
        return _SparseLogitsNLL.apply(logits, counts)
    return -(torch.log_softmax(logits, dim=-1) * counts).sum(1).mean()


def gaussian_kl(mu, logvar):
    """KL(N(mu, exp(logvar)) || N(0, I)), summed over dimensions, mean over cells.

    Parameters
    ----------
    mu, logvar : Tensor, shape (N, K)

    Returns
    -------
    Tensor, scalar
    """
    return -0.5 * torch.sum(1 + logvar - mu.pow(2) - logvar.exp(), dim=-1).mean()


def nb_log_prob(x, mu, theta):
    """log NB(x; mean mu, inverse dispersion theta) elementwise (scVI's parametrization).

    ``Var = mu + mu^2 / theta``;
    ``log p = lgamma(x + theta) - lgamma(theta) - lgamma(x + 1)
    + theta log(theta / (theta + mu)) + x log(mu / (theta + mu))``.
    Equals ``torch.distributions.NegativeBinomial(total_count=theta, logits=log mu - log theta)``.

    Parameters
    ----------
    x : Tensor, shape (N, M)
        Counts.
    mu : Tensor, shape (N, M)
        Positive means.
    theta : Tensor, shape (M,) or (N, M)
        Positive inverse dispersions (per gene in scVI).

    Returns
    -------
    Tensor, shape (N, M)
    """
    log_theta_mu = torch.log(theta + mu + EPS)
    return (
        theta * (torch.log(theta + EPS) - log_theta_mu)
        + x * (torch.log(mu + EPS) - log_theta_mu)
        + torch.lgamma(x + theta)
        - torch.lgamma(theta)
        - torch.lgamma(x + 1)
    )


def zinb_log_prob(x, mu, theta, pi):
    """log ZINB(x; mu, theta, dropout pi) elementwise (DCA / scDeepCluster's likelihood).

    ``p(0) = pi + (1 - pi) NB(0)``; ``p(x > 0) = (1 - pi) NB(x)``, with `nb_log_prob`'s NB.

    Parameters
    ----------
    x : Tensor, shape (N, M)
        Counts (scDeepCluster: raw counts; its mean is already scaled by the size factor).
    mu, theta : Tensor, shape (N, M)
        NB mean and inverse dispersion.
    pi : Tensor, shape (N, M)
        Dropout probabilities in [0, 1] (a sigmoid output).

    Returns
    -------
    Tensor, shape (N, M)
    """
    nb = nb_log_prob(x, mu, theta)
    # NB(0) = (theta / (theta + mu))^theta
    nb_zero = theta * (torch.log(theta + EPS) - torch.log(theta + mu + EPS))
    at_zero = torch.log(pi + (1 - pi) * torch.exp(nb_zero) + EPS)
    return torch.where(x < 0.5, at_zero, torch.log(1 - pi + EPS) + nb)


def zinb_loss(x, mean, disp, pi, size_factors):
    """DCA / scDeepCluster's ZINB loss: mean over entries of ``-log ZINB(x; s_i mean, disp, pi)``.

    Parameters
    ----------
    x : Tensor (N, M) or CSRCounts
        Raw counts. `CSRCounts` takes the sparse path, the same value and gradient: the
        zero-count term ``log(pi + (1 - pi) NB(0))`` is taken at every entry, and swapped for
        ``log((1 - pi) NB(x))`` at the stored counts only, so the NB's three ``lgamma`` (and their
        ``digamma`` gradients) cost nnz instead of N x M.
    mean, disp, pi : Tensor, shape (N, M)
        The decoder's ZINB heads (mean before the size factor, inverse dispersion, dropout).
    size_factors : Tensor, shape (N,)
        Cell total / median total (scDeepCluster's ``sf``).

    Returns
    -------
    Tensor, scalar
    """
    mu = mean * size_factors[:, None]
    if not isinstance(x, CSRCounts):
        return -zinb_log_prob(x, mu, disp, pi).mean()
    nb_zero = disp * (torch.log(disp + EPS) - torch.log(disp + mu + EPS))  # log NB(0), (N, M)
    at_zero = torch.log(pi + (1 - pi) * torch.exp(nb_zero) + EPS)  # (N, M)
    flat = x.flat_index()  # (nnz,)
    at = lambda t: t.reshape(-1).index_select(0, flat)  # noqa: E731  the stored entries of t, (nnz,)
    counts, pi_x = x.values.to(mu.dtype), at(pi)
    at_count = torch.log(1 - pi_x + EPS) + nb_log_prob(counts, at(mu), at(disp))  # (nnz,)
    # a stored zero keeps the zero-count term, as the dense path's x < 0.5 rule
    swap = torch.where(counts < 0.5, torch.zeros_like(at_count), at_count - at(at_zero))
    return -(at_zero.sum() + swap.sum()) / at_zero.numel()
