"""A linear layer and a squared error that take z-scored rows as they are stored: sparse plus an offset.

The autoencoders (`cellembed.models.autoencoders`) read every gene's z-score, ``z = S + o`` with
``S`` sparse (the counts' pattern) and ``o`` (M,) the z-score of a zero count
(`cellembed.data.minibatch.ScaledSparse`). Made dense, a batch of B rows costs B x M in each of
the five M-wide products of a step (the first layer forward and its weight's gradient; the last
layer forward, its weight's gradient and its input's gradient). Kept sparse:

- `GeneLinear`: ``z W + b = S W + (o W + b)`` (W stored M x h), and the weight's gradient
  ``S^T grad + o (sum grad)^T``; both cost nnz(S) x h;
- `scaled_sparse_mse`: the squared error of a linear decoder ``r_i = W g_i + b`` (M x h, h
  small) expands as ``||z_i - r_i||^2 = ||S_i||^2 - 2 S_i . (W g_i + c) + g_i^T G g_i + 2 g_i . u
  + ||c||^2`` with ``c = b - o``, ``G = W^T W`` (h x h) and ``u = W^T c``: the dense part is the
  Gram matrix (M x h^2), the sparse part ``S W`` (nnz x h). Cheaper than B x M x h when h < B.

Both are exact (to float rounding); `tests/test_sparse_nn.py` checks values and gradients
against autograd on the dense rows.

`SparseMatrix` is a constant sparse matrix times a dense one with autograd to the dense operand
(scGPCL's mean aggregation over a cell-gene graph): ``A @ h`` forward, ``A^T @ grad`` backward,
with ``A^T`` a CSR matrix of its own, made when a gradient first needs it.
"""

from __future__ import annotations

import torch
import numpy as np
import scipy.sparse as sp
from torch import nn
from torch.nn import functional as F

from cellembed.data.minibatch import ScaledSparse, csr_tensor


def _affine(values, offset, weight, bias):
    """``(S + o) @ weight + bias`` (B, h) for a sparse CSR ``S`` (B, M), ``weight`` (M, h), ``bias`` (h,)."""
    return (values @ weight).add_(torch.addmv(bias, weight.t(), offset))  # S W + (W^T o + b)


class _SparseLinear(torch.autograd.Function):
    """`_affine` with the gradients of ``weight`` and ``bias`` (from ``transposed``, S^T (M, B))."""

    @staticmethod
    def forward(ctx, values, transposed, offset, weight, bias):
        ctx.save_for_backward(transposed, offset)
        return _affine(values, offset, weight, bias)

    @staticmethod
    def backward(ctx, grad):
        transposed, offset = ctx.saved_tensors
        grad_sum = grad.sum(0)  # (h,)
        grad_w = (transposed @ grad).addr_(offset, grad_sum)  # (M, h): S^T grad + o (sum grad)^T
        return None, None, None, grad_w, grad_sum


def gene_linear(x, weight, bias=None):
    """``x @ weight + bias`` for dense rows or a `ScaledSparse` batch ``x`` (B, M); Tensor (B, h).

    ``weight`` is (M, h) (`GeneLinear`'s layout), ``bias`` (h,) or None. A sparse batch computes
    in float32, also under autocast (sparse products have no bfloat16 kernels on the CPU).
    """
    if not isinstance(x, ScaledSparse):
        return F.linear(x, weight.t(), bias)
    if bias is None:
        bias = weight.new_zeros(weight.shape[1])
    with torch.autocast(x.device.type, enabled=False):
        weight, bias = weight.float(), bias.float()
        if not (torch.is_grad_enabled() and (weight.requires_grad or bias.requires_grad)):
            # no gradient: the forward alone, and the batch's transpose (backward's) is never made
            return _affine(x.values, x.offset, weight, bias)
        return _SparseLinear.apply(x.values, x.transposed, x.offset, weight, bias)


class GeneLinear(nn.Module):
    """A linear layer from M genes to h units that also takes a `ScaledSparse` batch at nnz x h.

    As ``nn.Linear(n_genes, width)`` (the same initialization, drawn by one), but its weight is
    stored (M, h), the layout the sparse product and its gradient need (``nn.Linear`` keeps
    (h, M), which costs two (M, h) transposes a step). A state dict of an ``nn.Linear`` (an
    older saved model) loads, transposed.

    Parameters
    ----------
    n_genes : int
        M.
    width : int
        h.
    bias : bool
        With a bias (as ``nn.Linear``'s ``bias``).
    """

    def __init__(self, n_genes, width, bias=True):
        super().__init__()
        linear = nn.Linear(n_genes, width, bias=bias)
        self.in_features, self.out_features = n_genes, width  # as nn.Linear's
        self.weight = nn.Parameter(linear.weight.detach().t().contiguous())  # (M, h)
        self.bias = nn.Parameter(linear.bias.detach()) if bias else None  # (h,)

    def forward(self, x):
        """x: Tensor (B, M) or `ScaledSparse` (B, M) -> Tensor (B, h) (`gene_linear`)."""
        return gene_linear(x, self.weight, self.bias)

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        weight = state_dict.get(prefix + "weight")
        if weight is not None and weight.shape == self.weight.shape[::-1]:  # nn.Linear's (h, M)
            state_dict[prefix + "weight"] = weight.t().contiguous()
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def extra_repr(self):
        return f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}"


class _ScaledSparseMSE(torch.autograd.Function):
    """``mean_i ||S_i + o - (W g_i + b)||^2`` and its gradients for ``g``, ``W`` and ``b`` (module docstring)."""

    @staticmethod
    def forward(ctx, values, transposed, offset, g, weight, bias):
        c = bias - offset  # (M,)
        gram = weight.t() @ weight  # (h, h)
        u = weight.t() @ c  # (h,)
        projected = values @ weight  # (B, h): S W
        col_sums = (transposed @ g.new_ones(g.shape[0], 1))[:, 0]  # (M,) S^T 1
        squares = values.values().pow(2).sum()  # sum_i ||S_i||^2
        quad = ((g @ gram) * g).sum()  # sum_i g_i^T G g_i
        n = g.shape[0]
        total = squares - 2 * ((projected * g).sum() + col_sums.dot(c)) + quad + 2 * (g @ u).sum() + n * c.dot(c)
        ctx.save_for_backward(transposed, g, weight, gram, u, projected, c, col_sums)
        return total / n

    @staticmethod
    def backward(ctx, grad):
        transposed, g, weight, gram, u, projected, c, col_sums = ctx.saved_tensors
        scale = 2 * grad / g.shape[0]
        grad_g = scale * (g @ gram + u - projected)  # (B, h): W^T (r_i - z_i)
        g_sum = g.sum(0)  # (h,)
        # W (g^T g) + c (sum g)^T - S^T g: the residuals times g, summed over the batch
        grad_w = (transposed @ g).addmm_(weight, g.t() @ g, beta=-1).addr_(c, g_sum).mul_(scale)
        grad_b = torch.addmv(g.shape[0] * c - col_sums, weight, g_sum).mul_(scale)
        return None, None, None, grad_g, grad_w, grad_b


def scaled_sparse_mse(batch, g, layer):
    """``((batch.dense() - layer(g)) ** 2).sum(-1).mean()``, the dense B x M never built.

    Parameters
    ----------
    batch : `cellembed.data.minibatch.ScaledSparse`, shape (B, M)
        The targets.
    g : Tensor, shape (B, h)
        The decoder's last hidden layer.
    layer : nn.Linear(h, M)
        The decoder's output layer.

    Returns
    -------
    Tensor, scalar
        In float32, also under autocast.
    """
    with torch.autocast(batch.device.type, enabled=False):
        return _ScaledSparseMSE.apply(batch.values, batch.transposed, batch.offset, g.float(), layer.weight.float(),
                                      layer.bias.float())


class _SparseProduct(torch.autograd.Function):
    """``A @ dense`` (R, d) for a constant `SparseMatrix` A (R, C); the gradient of ``dense`` (C, d)."""

    @staticmethod
    def forward(ctx, dense, sparse):
        ctx.sparse = sparse
        return sparse.matrix @ dense

    @staticmethod
    def backward(ctx, grad):
        return ctx.sparse.transposed @ grad, None


class SparseMatrix:
    """A constant sparse matrix A (R, C) that multiplies dense ones: ``A @ h`` (R, d), with autograd to h.

    Kept as a torch CSR tensor; its transpose, which the gradient ``A^T @ grad`` needs (a CSR
    product, faster than torch's product with a transposed CSR), is made from the scipy matrix
    on first use, so a product without gradients (a full-graph pass) never holds it. Products
    are in float32, also under autocast (no bfloat16 sparse kernels on the CPU).

    Parameters
    ----------
    matrix : scipy.sparse matrix, shape (R, C)
    device : torch.device or str
    """

    def __init__(self, matrix, device="cpu"):
        self._scipy = sp.csr_matrix(matrix, dtype=np.float32)  # its arrays shared with `matrix`, on the CPU
        csr = self._scipy
        self.matrix = csr_tensor(csr.indptr, csr.indices, csr.data, csr.shape).to(device)
        self._transposed = None

    @property
    def transposed(self):
        """A^T (C, R) as a torch CSR tensor, made on first use."""
        if self._transposed is None:
            csc = self._scipy.tocsc()  # its arrays are the CSR arrays of the transpose
            self._transposed = csr_tensor(csc.indptr, csc.indices, csc.data, csc.shape[::-1]).to(self.device)
        return self._transposed

    @property
    def shape(self):
        """(R, C)."""
        return tuple(self.matrix.shape)

    @property
    def device(self):
        """Where the matrix is."""
        return self.matrix.device

    def to(self, device):
        """This matrix on ``device`` (the same object where it already is)."""
        if torch.device(device) == self.device:
            return self
        moved = SparseMatrix.__new__(SparseMatrix)
        moved._scipy, moved.matrix = self._scipy, self.matrix.to(device)
        moved._transposed = None if self._transposed is None else self._transposed.to(device)
        return moved

    def dense(self):
        """A as a dense Tensor (R, C) float32."""
        return self.matrix.to_dense()

    def __matmul__(self, dense):
        """``A @ dense`` for a Tensor (C, d): Tensor (R, d) float32."""
        with torch.autocast(self.device.type, enabled=False):
            return _SparseProduct.apply(dense.float(), self)
