"""Synapses → edges: count and sum synapses per (pre, post) neuron pair.

The fast path packs each synapse into one 64-bit word,
``pre << (b + s) | post << s | size`` (``b`` bits per neuron id or dense
index, ``s`` bits for the size), sorts the words by their high ``2 b``
bits, and reads each edge as a run of equal high bits: ``n_synapses`` is
the run length and ``total_size`` the sum of the low bits over the run.
8 bytes per synapse, no argsort and no gather.

On the CPU (Numba, compiled code that releases the GIL):

* :meth:`EdgeAccumulator.add` packs the words and scatters them into
  buckets by the top bits of the pre id (a counting sort: one histogram
  pass over ``pre``, one pack-and-scatter pass), split over threads;
* :meth:`EdgeAccumulator.result` gathers each bucket (about
  :data:`BUCKET` words, so it stays in cache), sorts it by an LSD radix
  sort on the id bits only (the size bits are summed, not sorted; passes
  whose digit is constant are skipped) and reduces the runs in the same
  compiled call, one bucket per task on a thread pool. The buckets, in
  pre-id order, concatenate into the sorted result.

On the GPU (CuPy) all words are one array sorted by CuPy's radix sort and
reduced with a cumulative sum.

Ids too large for the word (64-bit root ids) are first mapped to dense
indices (:class:`~connectome.graph._ids.IdIndex`); sizes too large for the
remaining bits fall back to a lexsort (slower, same result). Synapses with
a 0 id (a point in the background) are packed like the others and their
runs dropped at the end (counted in ``unassigned``).
"""

from __future__ import annotations

import functools
import os
from concurrent.futures import ThreadPoolExecutor

import numpy as np

from connectome.backend import get_xp, to_numpy
from connectome.errors import InputError
from connectome.graph._ids import IdIndex

EDGE_COLUMNS = ("pre_id", "post_id", "n_synapses", "total_size")
PIECE = 1 << 19  # smallest share of one add() a thread packs on its own
BUCKET = 1 << 17  # aim of the radix partition: words per bucket
RADIX_BITS = 11  # digit of one LSD pass (a 2048-entry histogram stays in L1)


@functools.cache
def _kernels():
    """Numba kernels of the CPU path, compiled (or loaded from cache) on first use."""
    import numba

    @numba.njit(nogil=True, cache=True)
    def histogram(pre, top_shift, n_buckets, counts):  # pragma: no cover - compiled
        if n_buckets == 1:
            counts[1] += pre.shape[0]
            return
        sh = np.uint64(top_shift)
        for i in range(pre.shape[0]):
            counts[np.int64(np.uint64(pre[i]) >> sh) + 1] += 1

    @numba.njit(nogil=True, cache=True)
    def pack_scatter(pre, post, size, has_size, shift_pre, shift_post, top_shift, n_buckets, pos, out):
        # pos: start of each bucket in out (advanced in place); returns the largest size seen
        sp = np.uint64(shift_pre)
        sq = np.uint64(shift_post)
        sh = np.uint64(top_shift)
        biggest = np.uint64(0)
        for i in range(pre.shape[0]):
            p = np.uint64(pre[i])
            w = (p << sp) | (np.uint64(post[i]) << sq)
            if has_size:
                s = np.uint64(size[i])
                if s > biggest:
                    biggest = s
                w |= s
            b = np.int64(p >> sh) if n_buckets > 1 else 0
            out[pos[b]] = w
            pos[b] += 1
        return biggest

    @numba.njit(nogil=True, cache=True)
    def sort_reduce(keys, tmp, lo_bit, n_bits, radix_bits, size_bits):  # pragma: no cover - compiled
        n = keys.shape[0]
        src = keys
        dst = tmp
        if n_bits > 0:
            n_pass = (n_bits + radix_bits - 1) // radix_bits
            width = (n_bits + n_pass - 1) // n_pass
            count = np.empty(1 << width, np.int64)
            shift = lo_bit
            left = n_bits
            while left > 0:
                bits = min(width, left)
                mask = np.uint64((1 << bits) - 1)
                sh = np.uint64(shift)
                count[:] = 0
                for i in range(n):
                    count[np.int64((src[i] >> sh) & mask)] += 1
                constant = False
                for d in range(1 << bits):
                    if count[d] == n:
                        constant = True
                        break
                if not constant:
                    total = 0
                    for d in range(1 << bits):
                        c = count[d]
                        count[d] = total
                        total += c
                    for i in range(n):
                        w = src[i]
                        d = np.int64((w >> sh) & mask)
                        dst[count[d]] = w
                        count[d] += 1
                    src, dst = dst, src
                shift += bits
                left -= bits
        hi = np.empty(n, np.uint64)
        counts = np.empty(n, np.int64)
        sums = np.empty(n, np.int64)
        ss = np.uint64(size_bits)
        low = np.uint64((1 << size_bits) - 1)
        k = -1
        prev = np.uint64(0)
        for i in range(n):
            w = src[i]
            h = w >> ss
            if k < 0 or h != prev:
                k += 1
                hi[k] = h
                counts[k] = 0
                sums[k] = 0
                prev = h
            counts[k] += 1
            sums[k] += np.int64(w & low)
        return hi[:k + 1].copy(), counts[:k + 1].copy(), sums[:k + 1].copy()

    return histogram, pack_scatter, sort_reduce


def _bits(value: int) -> int:
    return max(1, int(value).bit_length())


def _as_uint64(a, xp, name: str):
    a = xp.asarray(a)
    if a.ndim != 1:
        raise InputError(f"{name} must be 1-D, got shape {a.shape}")
    if a.dtype.kind == "u":
        return a
    if a.dtype.kind == "i":
        if a.size and int(a.min()) < 0:
            raise InputError(f"{name} must be non-negative, found {int(a.min())}")
        return a
    if a.dtype.kind == "f":
        if a.size and not bool(xp.all(a == xp.floor(a))):
            raise InputError(f"{name} must hold whole numbers, got dtype {a.dtype} with fractions")
        if a.size and int(a.min()) < 0:
            raise InputError(f"{name} must be non-negative, found {a.min()}")
        return a.astype(xp.uint64)
    raise InputError(f"{name} must be integers, got dtype {a.dtype}")


class EdgeAccumulator:
    """Aggregate synapses chunk by chunk into edges.

    Parameters
    ----------
    n_rows : int
        About how many synapses will be added (sizes the radix partition;
        memory is 8 bytes a synapse on the fast path).
    max_id : int
        Largest neuron id that will be added.
    max_size : int
        Largest synapse size that will be added (0 when sizes are unknown).
    ids : (n,) sorted unique uint64 array, optional
        The neuron ids. Needed only when ids are too large to pack directly;
        then every added id must be one of them, or 0 (unassigned).
    threads : int, optional
        Packing and sorting threads on the CPU (default: the CPU count).
    xp : module, optional
        ``numpy`` or ``cupy`` for the buffer (default NumPy).

    Attributes
    ----------
    n : int
        Synapses added.
    unassigned : int
        Synapses left out because a side has id 0 (known after :meth:`result`).
    """

    def __init__(self, n_rows: int, max_id: int, max_size: int = 0, *, ids=None, threads: int | None = None, xp=np):
        self.xp = xp
        self.size_bits = _bits(max_size) if max_size > 0 else 0
        self.index = None
        self.ids = None
        id_bits = _bits(max_id)
        if 2 * id_bits + self.size_bits > 64:
            if ids is None:
                raise InputError(f"neuron ids up to {max_id} need the list of neuron ids to be aggregated")
            ids = np.asarray(ids, np.uint64)
            self.ids = np.concatenate([np.zeros(1, np.uint64), ids[ids != 0]])  # dense index 0 = unassigned
            self.index = IdIndex(self.ids)
            id_bits = _bits(len(self.ids) - 1)
        self.id_bits = id_bits
        self.packed = 2 * id_bits + self.size_bits <= 64
        self.n = 0
        self.unassigned = 0
        n_rows = int(n_rows)
        self.n_rows = n_rows
        self.threads = max(1, threads or os.cpu_count() or 1)
        k = 0
        if xp is np and self.packed:
            k = min(12, self.id_bits, max(0, int(np.ceil(np.log2(max(n_rows, 1) / BUCKET)))))
        self.bucket_bits = k
        self.top_shift = self.id_bits - k  # pre >> top_shift = bucket
        self.pieces: list = []  # CPU: (words grouped by bucket, bucket starts)
        self.words: list = []  # GPU: packed words
        if not self.packed:  # sizes too large for the packed word: keep columns
            self.parts: list = []

    # ------------------------------------------------------------------ adding
    def add(self, pre, post, size=None) -> None:
        """Add a chunk of synapses (``pre``/``post`` neuron ids, ``size``)."""
        xp = self.xp
        pre = _as_uint64(pre, xp, "pre_id")
        post = _as_uint64(post, xp, "post_id")
        m = int(pre.shape[0])
        if post.shape[0] != m:
            raise InputError(f"pre_id and post_id differ in length: {m} vs {post.shape[0]}")
        if size is not None:
            size = _as_uint64(size, xp, "size")
            if size.shape[0] != m:
                raise InputError(f"size has {size.shape[0]} values for {m} synapses")
        if self.index is not None:
            pre, post = self._dense(pre), self._dense(post)
        if not self.packed:
            self.parts.append((to_numpy(pre).astype(np.uint64), to_numpy(post).astype(np.uint64),
                               np.zeros(m, np.int64) if size is None else to_numpy(size).astype(np.int64)))
            self.n += m
            return
        if m == 0:
            return
        if xp is np:
            self._add_cpu(pre, post, size)
        else:
            self._add_gpu(pre, post, size)
        self.n += m

    def _check_size(self, biggest: int) -> None:
        limit = 1 << self.size_bits
        if biggest >= limit:
            if self.size_bits == 0:
                raise InputError("synapse sizes were announced as absent (max_size=0) but some are positive")
            raise InputError(f"synapse size {biggest} exceeds the announced maximum {limit - 1}")

    def _add_cpu(self, pre, post, size) -> None:
        histogram, pack_scatter, _ = _kernels()
        pre = np.ascontiguousarray(pre)
        post = np.ascontiguousarray(post)
        has_size = size is not None
        size = np.ascontiguousarray(size) if has_size else np.zeros(1, np.uint64)
        nb = 1 << self.bucket_bits
        m = pre.shape[0]
        parts = max(1, min(self.threads, m // max(PIECE, 1)))
        bounds = np.linspace(0, m, parts + 1).astype(np.int64)

        def work(j):
            a, b = int(bounds[j]), int(bounds[j + 1])
            starts = np.zeros(nb + 1, np.int64)
            histogram(pre[a:b], self.top_shift, nb, starts)
            np.cumsum(starts, out=starts)
            out = np.empty(b - a, np.uint64)
            pos = starts[:-1].copy()
            biggest = pack_scatter(pre[a:b], post[a:b], size[a:b] if has_size else size, has_size,
                                   self.id_bits + self.size_bits, self.size_bits, self.top_shift, nb, pos, out)
            return out, starts, int(biggest)

        if parts > 1:
            with ThreadPoolExecutor(parts) as pool:
                done = list(pool.map(work, range(parts)))
        else:
            done = [work(0)]
        self._check_size(max(d[2] for d in done))
        self.pieces.extend((out, starts) for out, starts, _ in done)

    def _add_gpu(self, pre, post, size) -> None:
        xp = self.xp
        word = pre.astype(xp.uint64) << xp.uint64(self.id_bits + self.size_bits)
        word |= post.astype(xp.uint64) << xp.uint64(self.size_bits)
        if size is not None:
            self._check_size(int(size.max()))
            word |= size.astype(xp.uint64)
        self.words.append(word)

    def _dense(self, ids):
        idx = self.index.lookup(to_numpy(ids))
        if np.any(idx < 0):
            k = int(np.argmax(idx < 0))
            raise InputError(f"{int(np.sum(idx < 0))} synapses name neurons that are not in the neuron table, "
                             f"e.g. {int(to_numpy(ids)[k])}")
        return self.xp.asarray(idx)

    # ------------------------------------------------------------------ result
    def result(self) -> dict:
        """The edges: columns ``pre_id, post_id, n_synapses, total_size``, sorted by (pre_id, post_id)."""
        if not self.packed:
            return self._result_unpacked()
        xp = self.xp
        if xp is np:
            results = self._result_cpu()
        else:
            words, self.words = self.words, []
            keys = words[0] if len(words) == 1 else (xp.concatenate(words) if words else xp.zeros(0, xp.uint64))
            del words
            keys.sort()
            results = [self._reduce_whole(keys)] if keys.shape[0] else []
        if not results:
            results = [(xp.zeros(0, xp.uint64), xp.zeros(0, xp.int64), xp.zeros(0, xp.int64))]
        hi = xp.concatenate([r[0] for r in results])
        counts = xp.concatenate([r[1] for r in results])
        sums = xp.concatenate([r[2] for r in results])
        del results
        id_mask = xp.uint64((1 << self.id_bits) - 1)
        pre = hi >> xp.uint64(self.id_bits)
        post = hi & id_mask
        return self._finish(pre, post, counts, sums)

    def _result_cpu(self) -> list:
        _, _, sort_reduce = _kernels()
        pieces, self.pieces = self.pieces, []
        nb = 1 << self.bucket_bits
        if not pieces:
            return []
        sizes = np.sum([starts[1:] - starts[:-1] for _, starts in pieces], axis=0)
        todo = [int(i) for i in np.flatnonzero(sizes)]
        n_bits = 2 * self.id_bits - self.bucket_bits  # the bucket's top bits are all equal

        def work(i):
            keys = np.empty(int(sizes[i]), np.uint64)
            at = 0
            for out, starts in pieces:
                a, b = int(starts[i]), int(starts[i + 1])
                keys[at:at + b - a] = out[a:b]
                at += b - a
            return sort_reduce(keys, np.empty_like(keys), self.size_bits, n_bits, RADIX_BITS, self.size_bits)

        if len(todo) > 1 and self.threads > 1:
            with ThreadPoolExecutor(min(self.threads, len(todo))) as pool:
                results = list(pool.map(work, todo))
        else:
            results = [work(i) for i in todo]
        return results

    def _finish(self, pre, post, counts, sums) -> dict:
        xp = get_xp(pre)
        real = (pre != 0) & (post != 0)
        self.unassigned = int(counts[~real].sum()) if not bool(real.all()) else 0
        if self.unassigned or not bool(real.all()):
            pre, post, counts, sums = pre[real], post[real], counts[real], sums[real]
        if self.index is not None:
            ids = xp.asarray(self.ids)
            pre, post = ids[pre.astype(xp.int64)], ids[post.astype(xp.int64)]
        return {"pre_id": pre.astype(xp.uint64, copy=False), "post_id": post.astype(xp.uint64, copy=False),
                "n_synapses": counts.astype(xp.int64, copy=False), "total_size": sums.astype(xp.int64, copy=False)}

    def _reduce_whole(self, keys):
        """Runs of equal high bits in sorted ``keys`` (any array module): high bits, lengths, low-bit sums."""
        xp = get_xp(keys)
        n = keys.shape[0]
        hi = keys >> xp.uint64(self.size_bits)
        start = xp.empty(n, bool)
        start[0] = True
        xp.not_equal(hi[1:], hi[:-1], out=start[1:])
        first = xp.flatnonzero(start)
        counts = xp.diff(xp.concatenate([first, xp.asarray([n], first.dtype)]))
        if self.size_bits:
            low = (keys & xp.uint64((1 << self.size_bits) - 1)).astype(xp.int64)
            cs = xp.cumsum(low)
            ends = cs[first + counts - 1]
            sums = ends - xp.concatenate([xp.zeros(1, xp.int64), ends[:-1]])
        else:
            sums = xp.zeros(first.shape[0], xp.int64)
        return hi[first], counts, sums

    def _result_unpacked(self) -> dict:
        if self.parts:
            pre, post, size = (np.concatenate(c) for c in zip(*self.parts))
        else:
            pre = post = np.zeros(0, np.uint64)
            size = np.zeros(0, np.int64)
        self.parts = []
        order = np.lexsort((post, pre))
        pre, post, size = pre[order], post[order], size[order]
        n = pre.size
        start = np.ones(n, bool)
        if n:
            start[1:] = (pre[1:] != pre[:-1]) | (post[1:] != post[:-1])
        first = np.flatnonzero(start)
        counts = np.diff(first, append=n)
        sums = np.add.reduceat(size, first) if n else np.zeros(0, np.int64)
        xp = self.xp
        out = self._finish(pre[first], post[first], counts, sums)
        return {k: xp.asarray(v) for k, v in out.items()}


def aggregate_edges(pre_id, post_id, size=None, *, ids=None, threads: int | None = None) -> dict:
    """Aggregate a synapse table into the edges of the connectivity graph.

    Parameters
    ----------
    pre_id, post_id : (m,) integer arrays (NumPy or CuPy)
        Neuron of the pre- and post-synaptic side of each synapse; 0 means
        unassigned (the point fell in the background) and is left out.
    size : (m,) integer array, optional
        Synapse size (e.g. cleft voxels); ``total_size`` is 0 without it.
    ids : (n,) sorted uint64 array, optional
        Neuron ids; needed only for ids above 2**21 or so, where a synapse
        word has no room for two raw ids (64-bit root ids). Computed from
        the input when not given.
    threads : int, optional
        Packing and sorting threads on the CPU (default: the CPU count).

    Returns
    -------
    dict of str to (k,) arrays
        ``pre_id``, ``post_id`` uint64, ``n_synapses``, ``total_size``
        int64, sorted by ``(pre_id, post_id)``; the same kind of array as
        the input.

    Notes
    -----
    One sort of one packed 64-bit word per synapse (see the module notes);
    equivalent to ``SELECT pre_id, post_id, count(*), sum(size) … WHERE
    pre_id <> 0 AND post_id <> 0 GROUP BY pre_id, post_id ORDER BY pre_id,
    post_id``.

    Examples
    --------
    >>> e = aggregate_edges(np.array([1, 2, 1]), np.array([2, 1, 2]), np.array([5, 3, 4]))
    >>> e["n_synapses"].tolist(), e["total_size"].tolist()
    ([2, 1], [9, 3])
    """
    xp = get_xp(pre_id, post_id)
    pre = _as_uint64(pre_id, xp, "pre_id")
    post = _as_uint64(post_id, xp, "post_id")
    if pre.shape != post.shape:
        raise InputError(f"pre_id and post_id differ in length: {pre.shape[0]} vs {post.shape[0]}")
    m = int(pre.shape[0])
    max_id = int(max(int(pre.max()), int(post.max()))) if m else 1
    max_size = 0
    if size is not None:
        size = _as_uint64(size, xp, "size")
        if size.shape != pre.shape:
            raise InputError(f"size has {size.shape[0]} values for {m} synapses")
        max_size = int(size.max()) if m else 0
    if ids is None and 2 * _bits(max_id) + (_bits(max_size) if max_size else 0) > 64:
        both = xp.concatenate([pre, post])
        ids = to_numpy(xp.unique(both[both != 0])).astype(np.uint64)
    acc = EdgeAccumulator(m, max_id, max_size, ids=ids, threads=threads, xp=xp)
    acc.add(pre, post, size)
    return acc.result()
