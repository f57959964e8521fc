"""The louvain package's RBConfiguration optimisation, step for step, compiled with numba.

scanpy's ``sc.tl.louvain`` (``flavor='vtraag'``, the assignment's call) runs

    louvain.find_partition(graph, louvain.RBConfigurationVertexPartition,
                           resolution_parameter=resolution, seed=seed)

on an unweighted directed igraph graph. `find_partition` below reproduces that call exactly
(same membership vector, same community numbers) for the louvain package 0.8.2, whose C++
sources (github.com/vtraag/louvain-igraph, tag 0.8.2, src/louvain/*.cpp) vendor the igraph
C core 0.10.10. What the package does, and where each piece lives here:

* ``functions.py::find_partition``: a singleton partition, ``Optimiser()``,
  ``set_rng_seed(seed)``, ``optimise_partition`` -> `_optimise_partition`.
* ``Optimiser.cpp::optimise_partition``: move nodes on the current (collapsed) graph,
  carry the result to the original nodes (``from_coarse_partition``), collapse the graph by
  community, repeat while a pass of moves improved the quality -> `_optimise_partition`.
* ``Optimiser.cpp::move_nodes`` (defaults ``consider_comms = ALL_NEIGH_COMMS``,
  ``consider_empty_community = true``): shuffle the nodes once, then sweep them in that order
  until a sweep moves nothing; each node goes to the neighbour community (or the reusable
  empty community) with the largest ``diff_move`` -> `_move_nodes`.
* ``RBConfigurationVertexPartition.cpp::diff_move`` -> inside `_move_nodes`, same expression
  order.
* ``MutableVertexPartition.cpp``: the community sums (``init_admin``, ``move_node``), the
  per-node neighbour-community weight caches (``cache_neigh_communities``, keyed by the
  node and never invalidated by moves), the stack of empty communities
  (``get_empty_community``, ``add_empty_community``), ``renumber_communities``.
* ``GraphHelper.cpp``: ``shuffle`` (Fisher-Yates driven by ``igraph_rng_get_integer``),
  ``collapse_graph`` (edges sorted by (source community, target community), self loops
  carry a community's internal weight), the strengths and self weights of ``init_admin`` /
  ``set_self_weights``.
* igraph 0.10.10 ``src/random/rng_mt19937.c`` and ``random.c``: the Optimiser's own MT19937
  and Lemire's bounded integer draw (`_mt_seed`, `_mt_next`, `_random_int`).

Neighbour order. igraph lists a node's out-edges by target and in-edges by source
(``igraph_incident``, ``type_indexededgelist.c``); the graphs here have no multi-edges (a CSR
pattern, and ``collapse_graph``'s map), so a CSR row with sorted columns is the out-list and
the transposed CSR the in-list.

Floating point. Every weight is a whole number (1.0 per edge of the input; sums of those
after collapsing), so every sum the package keeps (strengths, community totals, a node's
weight to a community) is an exact integer below 2**53 whatever the order of addition.
The only rounded arithmetic is ``diff_move``'s, which `_move_nodes` writes in the C++ order
(numba compiles without fast-math, so LLVM neither reorders nor fuses it).
"""

from __future__ import annotations

import numba
import numpy as np

# ---------------------------------------------------------------------------------------
# igraph's MT19937 (src/random/rng_mt19937.c, igraph 0.10.10), in uint64 words masked to 32
# bits (numba would turn mixed uint32 / int64 arithmetic into floats).
_MT_N = 624
_MT_M = 397
_MASK32 = np.uint64(0xFFFFFFFF)
_UPPER_MASK = np.uint64(0x80000000)
_LOWER_MASK = np.uint64(0x7FFFFFFF)
_MATRIX_A = np.uint64(0x9908B0DF)
_TWO32 = np.uint64(1 << 32)

# Optimiser.cpp::move_nodes: a neighbour community must improve the quality by more than this
_EPS = 1e-10


@numba.njit(cache=True)
def _mt_seed(seed):  # pragma: no cover - compiled
    """``igraph_rng_mt19937_seed``: state words 0..623, word 624 holds ``mti``.

    Parameters
    ----------
    seed : uint64
        ``Optimiser::set_rng_seed(size_t)``'s argument; 0 means 4357, as in igraph.

    Returns
    -------
    ndarray of uint64, shape (625,)
    """
    mt = np.zeros(_MT_N + 1, np.uint64)
    if seed == np.uint64(0):
        seed = np.uint64(4357)  # "the default seed is 4357"
    mt[0] = seed & _MASK32
    for i in range(1, _MT_N):
        prev = mt[i - 1]
        mt[i] = (np.uint64(1812433253) * (prev ^ (prev >> np.uint64(30))) + np.uint64(i)) & _MASK32
    mt[_MT_N] = np.uint64(_MT_N)  # mti = N: the first draw regenerates the block
    return mt


@numba.njit(cache=True)
def _mt_next(mt):  # pragma: no cover - compiled
    """``igraph_rng_mt19937_get``: the next 32-bit word (as uint64)."""
    mti = np.int64(mt[_MT_N])
    if mti >= _MT_N:  # generate N words at one time
        for kk in range(_MT_N - _MT_M):
            y = (mt[kk] & _UPPER_MASK) | (mt[kk + 1] & _LOWER_MASK)
            mt[kk] = mt[kk + _MT_M] ^ (y >> np.uint64(1)) ^ (_MATRIX_A if y & np.uint64(1) else np.uint64(0))
        for kk in range(_MT_N - _MT_M, _MT_N - 1):
            y = (mt[kk] & _UPPER_MASK) | (mt[kk + 1] & _LOWER_MASK)
            mt[kk] = mt[kk + (_MT_M - _MT_N)] ^ (y >> np.uint64(1)) ^ (
                _MATRIX_A if y & np.uint64(1) else np.uint64(0))
        y = (mt[_MT_N - 1] & _UPPER_MASK) | (mt[0] & _LOWER_MASK)
        mt[_MT_N - 1] = mt[_MT_M - 1] ^ (y >> np.uint64(1)) ^ (_MATRIX_A if y & np.uint64(1) else np.uint64(0))
        mti = 0
    k = mt[mti]  # tempering
    k ^= k >> np.uint64(11)
    k ^= (k << np.uint64(7)) & np.uint64(0x9D2C5680)
    k ^= (k << np.uint64(15)) & np.uint64(0xEFC60000)
    k ^= k >> np.uint64(18)
    mt[_MT_N] = np.uint64(mti + 1)
    return k


@numba.njit(cache=True)
def _random_int(mt, low, high):  # pragma: no cover - compiled
    """``igraph_rng_get_integer(rng, low, high)`` (GraphHelper.h ``get_random_int``).

    For a range below 2**32 igraph draws one 32-bit word per try with Lemire's debiased
    multiplication (``igraph_i_rng_get_uint32_bounded``); ``low == high`` draws nothing.
    """
    if high == low:
        return low
    r = np.uint64(high - low + 1)
    t = (_TWO32 - r) % r  # (-range) % range in uint32
    while True:
        m = _mt_next(mt) * r
        if (m & _MASK32) >= t:
            return low + np.int64(m >> np.uint64(32))


@numba.njit(cache=True)
def _shuffle(nodes, mt):  # pragma: no cover - compiled
    """GraphHelper.cpp ``shuffle``: Fisher-Yates from the last position down to 1."""
    for idx in range(nodes.size - 1, 0, -1):
        j = _random_int(mt, 0, idx)
        tmp = nodes[idx]
        nodes[idx] = nodes[j]
        nodes[j] = tmp


# ---------------------------------------------------------------------------------------
# Graphs: out-CSR (igraph's out-incidence order) + in-CSR, the per-node sums the package
# caches in Graph::init_admin and Graph::set_self_weights.


@numba.njit(cache=True)
def _transpose(n, out_ptr, out_idx, out_w):  # pragma: no cover - compiled
    """In-lists sorted by source (igraph's in-incidence order), with their weights."""
    in_ptr = np.zeros(n + 1, np.int64)
    for p in range(out_idx.size):
        in_ptr[out_idx[p] + 1] += 1
    for v in range(n):
        in_ptr[v + 1] += in_ptr[v]
    fill = in_ptr[:-1].copy()
    in_idx = np.empty(out_idx.size, np.int64)
    in_w = np.empty(out_idx.size, np.float64)
    for v in range(n):  # sources in increasing order: every in-list comes out sorted
        for p in range(out_ptr[v], out_ptr[v + 1]):
            u = out_idx[p]
            in_idx[fill[u]] = v
            in_w[fill[u]] = out_w[p]
            fill[u] += 1
    return in_ptr, in_idx, in_w


@numba.njit(cache=True)
def _node_sums(n, out_ptr, out_idx, out_w, in_ptr, in_w):  # pragma: no cover - compiled
    """Graph::init_admin's strengths (self loops count once each way, as
    ``igraph_strength(..., loops=true)`` on a directed graph), Graph::set_self_weights'
    self-loop weights, and the total weight."""
    k_out = np.zeros(n, np.float64)
    k_in = np.zeros(n, np.float64)
    self_w = np.zeros(n, np.float64)
    total = 0.0
    for v in range(n):
        for p in range(out_ptr[v], out_ptr[v + 1]):
            k_out[v] += out_w[p]
            total += out_w[p]
            if out_idx[p] == v:
                self_w[v] = out_w[p]
        for p in range(in_ptr[v], in_ptr[v + 1]):
            k_in[v] += in_w[p]
    return k_out, k_in, self_w, total


@numba.njit(cache=True)
def _collapse(n, out_ptr, out_idx, out_w, membership, n_comms):  # pragma: no cover - compiled
    """GraphHelper.cpp ``Graph::collapse_graph``: one node per community, one edge per
    (source community, target community) pair that has an edge, weighted by the sum of
    those edges, listed by source then target (its ``vector< map<size_t, double> >``), so
    a community's internal edges become its self loop.

    Returns
    -------
    ptr : ndarray of int, shape (n_comms + 1,)
    idx : ndarray of int, shape (m,)
    w : ndarray of float, shape (m,)
    """
    # nodes bucketed by community
    start = np.zeros(n_comms + 1, np.int64)
    for v in range(n):
        start[membership[v] + 1] += 1
    for c in range(n_comms):
        start[c + 1] += start[c]
    fill = start[:-1].copy()
    order = np.empty(n, np.int64)
    for v in range(n):
        order[fill[membership[v]]] = v
        fill[membership[v]] += 1

    acc = np.zeros(n_comms, np.float64)
    seen = np.zeros(n_comms, np.bool_)
    touched = np.empty(n_comms, np.int64)
    ptr = np.zeros(n_comms + 1, np.int64)
    idx = np.empty(out_idx.size, np.int64)  # at most one collapsed edge per edge
    w = np.empty(out_idx.size, np.float64)
    m = 0
    for c in range(n_comms):
        n_touched = 0
        for q in range(start[c], start[c + 1]):
            v = order[q]
            for p in range(out_ptr[v], out_ptr[v + 1]):
                d = membership[out_idx[p]]
                if not seen[d]:
                    seen[d] = True
                    touched[n_touched] = d
                    n_touched += 1
                acc[d] += out_w[p]  # whole numbers: exact in any order
        targets = np.sort(touched[:n_touched])  # std::map iterates its keys in order
        for d in targets:
            idx[m] = d
            w[m] = acc[d]
            m += 1
            acc[d] = 0.0
            seen[d] = False
        ptr[c + 1] = m
    return ptr, idx[:m].copy(), w[:m].copy()


# ---------------------------------------------------------------------------------------
# The partition (MutableVertexPartition + RBConfigurationVertexPartition)


@numba.njit(cache=True)
def _scan(v, nbr_ptr, nbr_idx, nbr_w, membership, marked, neigh, n_neigh,
          fill_cache, weight, listed, n_listed):  # pragma: no cover - compiled
    """One direction of v's incident edges: their communities into the neighbour set, and,
    with ``fill_cache``, MutableVertexPartition::cache_neigh_communities for that direction.

    The neighbour set is ``get_neigh_comms(v, IGRAPH_ALL)`` poured into the Optimiser's
    ``std::set`` (every weight is positive, so each neighbour's community is listed).
    The cache zeroes the entries it listed last time, then adds each edge's weight to its
    endpoint's community, listing it whenever the running sum is non-zero, as the C++ does.

    Returns
    -------
    n_neigh, n_listed : int
        The new lengths of ``neigh`` and ``listed``.
    """
    if fill_cache:
        for i in range(n_listed):
            weight[listed[i]] = 0.0
        n_listed = 0
    for p in range(nbr_ptr[v], nbr_ptr[v + 1]):
        comm = membership[nbr_idx[p]]
        if not marked[comm]:
            marked[comm] = True
            neigh[n_neigh] = comm
            n_neigh += 1
        if fill_cache:
            weight[comm] += nbr_w[p]
            if weight[comm] != 0:
                listed[n_listed] = comm
                n_listed += 1
    return n_neigh, n_listed


@numba.njit(cache=True)
def _renumber(membership, n_comms, csize, n_nodes_in):  # pragma: no cover - compiled
    """MutableVertexPartition::renumber_communities: communities sorted by size (sum of node
    sizes) descending, then node count descending, then id (``orderCSize``); the largest
    gets 0. Returns the new community count (the non-empty ones)."""
    ids = np.arange(n_comms)
    order = ids[np.argsort(-n_nodes_in[:n_comms], kind="mergesort")]  # stable sorts,
    order = order[np.argsort(-csize[:n_comms][order], kind="mergesort")]  # last key first
    new_id = np.empty(n_comms, np.int64)
    for i in range(n_comms):
        new_id[order[i]] = i
    n_new = 0
    for v in range(membership.size):
        membership[v] = new_id[membership[v]]
        n_new = max(n_new, membership[v] + 1)
    return n_new


@numba.njit(cache=True)
def _move_nodes(n, out_ptr, out_idx, out_w, in_ptr, in_idx, in_w, symmetric, node_size,
                resolution, mt, membership):  # pragma: no cover - compiled
    """Optimiser::move_nodes on a singleton partition of one (collapsed) graph.

    With ``symmetric`` (the in-lists equal the out-lists, weights included: every graph
    built from a kNN pattern, collapsed or not) the in-direction sums equal the
    out-direction ones exactly, so they share arrays and are computed once.

    Fills ``membership`` (renumbered as the C++ does at the end) and returns the number of
    communities and the total improvement (a sum of positive terms: > 0 iff a node moved).
    """
    k_out, k_in, self_w, total_weight = _node_sums(n, out_ptr, out_idx, out_w, in_ptr, in_w)
    total = total_weight * (2.0 - 1.0)  # diff_move: total_weight()*(2.0 - is_directed())

    # MutableVertexPartition::init_admin on the singleton partition
    for v in range(n):
        membership[v] = v
    n_comms = n
    n_nodes_in = np.ones(n, np.int64)  # community[c]->size()
    csize = node_size.copy()  # _csize
    k_from_comm = k_out.copy()  # _total_weight_from_comm
    k_to_comm = k_from_comm if symmetric else k_in.copy()  # _total_weight_to_comm
    empty = np.empty(n, np.int64)  # _empty_communities, a stack (back = top)
    n_empty = 0

    # cache_neigh_communities' state, keyed by node and not invalidated by moves (as in
    # C++); the OUT and IN caches are always filled together (diff_move asks for both)
    max_deg = 1
    has_other = np.zeros(n, np.bool_)  # v has an in- or out-neighbour other than itself
    for v in range(n):
        max_deg = max(max_deg, out_ptr[v + 1] - out_ptr[v], in_ptr[v + 1] - in_ptr[v])
        for p in range(out_ptr[v], out_ptr[v + 1]):
            has_other[v] |= out_idx[p] != v
        for p in range(in_ptr[v], in_ptr[v + 1]):
            has_other[v] |= in_idx[p] != v
    w_to = np.zeros(n, np.float64)  # _cached_weight_to_community
    w_from = w_to if symmetric else np.zeros(n, np.float64)  # _cached_weight_from_community
    to_listed = np.empty(max_deg, np.int64)
    from_listed = np.empty(max_deg, np.int64)
    n_to_listed = 0
    n_from_listed = 0
    cache_key = n + 1  # _current_node_cache_community_to (and _from)
    neigh = np.empty(2 * max_deg, np.int64)  # get_neigh_comms(v, IGRAPH_ALL), deduplicated
    marked = np.zeros(n, np.bool_)

    nodes = np.arange(n)
    _shuffle(nodes, mt)

    total_improv = 0.0
    nb_moves = 1
    while nb_moves > 0:
        improv = 0.0
        nb_moves = 0
        for v in nodes:
            v_comm = membership[v]
            # diff_move(v, c != v_comm) runs during this visit iff v has another neighbour
            # (then either its community differs from v's, or v does not sit alone and the
            # empty community is tried) or v does not sit alone; the first such call fills
            # the caches unless they still hold v (total weight 0: diff_move returns first)
            fill = (has_other[v] or n_nodes_in[v_comm] > 1) and total != 0.0 and cache_key != v
            if fill:
                cache_key = v
            n_neigh, n_to_listed = _scan(v, out_ptr, out_idx, out_w, membership, marked, neigh, 0,
                                         fill, w_to, to_listed, n_to_listed)
            if not symmetric:
                n_neigh, n_from_listed = _scan(v, in_ptr, in_idx, in_w, membership, marked, neigh,
                                               n_neigh, fill, w_from, from_listed, n_from_listed)

            # RBConfigurationVertexPartition::diff_move(v, comm), in the C++ order; the
            # old-community half is the same for every comm
            kv_out = k_out[v]
            kv_in = k_in[v]
            self_weight = self_w[v]
            diff_old = 0.0  # unused when total == 0 (diff_move returns first)
            if total != 0.0:
                diff_old = (w_to[v_comm] - resolution * kv_out * k_to_comm[v_comm] / total) + \
                    (w_from[v_comm] - resolution * kv_in * k_from_comm[v_comm] / total)

            max_comm = v_comm
            max_improv = 0.0
            for i in range(n_neigh):
                comm = neigh[i]
                marked[comm] = False
                if comm == v_comm or total == 0.0:
                    continue  # diff_move returns 0.0, which never beats max_improv
                K_out_new = k_from_comm[comm] + kv_out
                K_in_new = k_to_comm[comm] + kv_in
                diff_new = (w_to[comm] + self_weight - resolution * kv_out * K_in_new / total) + \
                    (w_from[comm] + self_weight - resolution * kv_in * K_out_new / total)
                possible = diff_new - diff_old
                # the C++ walks the std::set in increasing order and keeps the first strict
                # maximum above eps: the largest gain, the lowest community among equals
                if possible > _EPS and (possible > max_improv
                                        or (possible == max_improv and comm < max_comm)):
                    max_comm = comm
                    max_improv = possible

            # consider_empty_community, only if v does not sit alone
            if n_nodes_in[v_comm] > 1:
                if n_empty == 0:  # get_empty_community -> add_empty_community
                    comm = n_comms
                    n_comms += 1
                    n_nodes_in[comm] = 0
                    csize[comm] = 0
                    k_from_comm[comm] = 0.0
                    k_to_comm[comm] = 0.0
                    empty[n_empty] = comm
                    n_empty += 1
                comm = empty[n_empty - 1]
                if total != 0.0:
                    K_out_new = k_from_comm[comm] + kv_out
                    K_in_new = k_to_comm[comm] + kv_in
                    diff_new = (w_to[comm] + self_weight - resolution * kv_out * K_in_new / total) + \
                        (w_from[comm] + self_weight - resolution * kv_in * K_out_new / total)
                    possible = diff_new - diff_old
                    if possible > max_improv:  # no eps here, as in the C++
                        max_improv = possible
                        max_comm = comm

            if max_comm != v_comm:
                improv += max_improv
                # MutableVertexPartition::move_node(v, max_comm)
                new_comm = max_comm
                n_nodes_in[v_comm] -= 1
                csize[v_comm] -= node_size[v]
                if n_nodes_in[v_comm] == 0:
                    empty[n_empty] = v_comm
                    n_empty += 1
                if n_nodes_in[new_comm] == 0:  # erase its last occurrence in the stack
                    for i in range(n_empty - 1, -1, -1):
                        if empty[i] == new_comm:
                            for j in range(i, n_empty - 1):
                                empty[j] = empty[j + 1]
                            n_empty -= 1
                            break
                n_nodes_in[new_comm] += 1
                csize[new_comm] += node_size[v]
                for p in range(out_ptr[v], out_ptr[v + 1]):
                    k_from_comm[v_comm] -= out_w[p]
                    k_from_comm[new_comm] += out_w[p]
                if not symmetric:
                    for p in range(in_ptr[v], in_ptr[v + 1]):
                        k_to_comm[v_comm] -= in_w[p]
                        k_to_comm[new_comm] += in_w[p]
                membership[v] = new_comm
                nb_moves += 1
        total_improv += improv

    n_comms = _renumber(membership, n_comms, csize, n_nodes_in)
    return n_comms, total_improv


@numba.njit(cache=True)
def _optimise_partition(n, out_ptr, out_idx, resolution, seed):  # pragma: no cover - compiled
    """Optimiser::optimise_partition for one layer, from the singleton partition of an
    unweighted directed graph; the final ``renumber_communities`` included."""
    mt = _mt_seed(seed)
    ptr, idx = out_ptr, out_idx
    w = np.ones(out_idx.size, np.float64)
    node_size = np.ones(n, np.int64)
    membership = np.arange(n)  # the original graph's partition
    level_n = n
    level = 0
    while True:
        in_ptr, in_idx, in_w = _transpose(level_n, ptr, idx, w)
        symmetric = (np.array_equal(in_ptr, ptr) and np.array_equal(in_idx, idx)
                     and np.array_equal(in_w, w))
        coarse = np.empty(level_n, np.int64)
        n_comms, improv = _move_nodes(level_n, ptr, idx, w, in_ptr, in_idx, in_w, symmetric,
                                      node_size, resolution, mt, coarse)
        if level == 0:
            membership[:] = coarse
        else:  # from_coarse_partition
            for v in range(n):
                membership[v] = coarse[membership[v]]
        if not improv > 0:  # the do-while's test; its last collapse_graph is never used
            break
        # collapse_graph; the new nodes' sizes are the communities' sizes
        new_size = np.zeros(n_comms, np.int64)
        for v in range(level_n):
            new_size[coarse[v]] += node_size[v]
        ptr, idx, w = _collapse(level_n, ptr, idx, w, coarse, n_comms)
        node_size = new_size
        level_n = n_comms
        level += 1
    # the last renumber_communities, on the original graph (node sizes 1)
    counts = np.zeros(n, np.int64)
    for v in range(n):
        counts[membership[v]] += 1
    _renumber(membership, n, counts, counts)
    return membership


def find_partition(indptr, indices, n_nodes, resolution, seed):
    """``louvain.find_partition(graph, RBConfigurationVertexPartition, seed=seed,
    resolution_parameter=resolution)`` on an unweighted directed graph.

    Parameters
    ----------
    indptr : ndarray of int, shape (n_nodes + 1,)
    indices : ndarray of int, shape (m,)
        The graph's edges as a CSR pattern, one directed edge per stored entry, columns
        sorted within each row and no repeated entry (igraph's out-incidence order).
        Self loops are allowed.
    n_nodes : int
    resolution : float
        RBConfiguration's resolution parameter.
    seed : int
        The Optimiser's seed (a C int, as ``Optimiser.set_rng_seed`` parses it).

    Returns
    -------
    ndarray of int, shape (n_nodes,)
        Community of every node, numbered as the package numbers them (largest first).
    """
    if not -(2**31) <= int(seed) < 2**31:
        raise OverflowError(f"seed {seed} does not fit in a C int, as louvain's set_rng_seed requires")
    if n_nodes == 0:
        return np.zeros(0, dtype=np.int64)
    seed64 = np.uint64(int(seed) % 2**64)  # int -> size_t, as Optimiser::set_rng_seed takes it
    return _optimise_partition(int(n_nodes), np.asarray(indptr, dtype=np.int64),
                               np.asarray(indices, dtype=np.int64), float(resolution), seed64)
