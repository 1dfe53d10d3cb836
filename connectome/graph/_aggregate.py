"""Synapses → edges: count and sum synapses per (pre, post) neuron pair.

The fast path packs each synapse into one 64-bit word,
``pre << (b + s) | post << s | size`` (``b`` bits per neuron id or dense
index, ``s`` bits for the size), sorts the words by their high ``2 b``
bits, and reads each edge as a run of equal high bits: ``n_synapses`` is
the run length and ``total_size`` the sum of the low bits over the run.
8 bytes per synapse, no argsort and no gather.

On the CPU (Numba, compiled code that releases the GIL):

* :meth:`EdgeAccumulator.add` packs the words of a chunk and scatters them
  into buckets by the top bits of the pre id (a counting sort: one
  histogram loop and one pack-and-scatter loop in a single compiled call).
  Chunks go to consecutive places of one arena (8 bytes a synapse,
  allocated once, its pages touched only as they fill), and ``add`` may be
  called from several threads at once: a file is read and packed by row
  groups in parallel (:func:`workflows.graph.aggregate_synapse_file`).
* :meth:`EdgeAccumulator.iter_result` takes the buckets in pre-id order,
  one per task on a thread pool: a compiled call gathers the bucket's words
  from every chunk (about :data:`BUCKET` words, so it stays in cache) while
  counting all radix digits at once, sorts it by an LSD radix sort on the
  id bits only (the size bits are summed, not sorted; digits that are
  constant are skipped), reduces the runs to edges, maps dense indices back
  to ids and adds each edge to the neurons' synapse and partner counts
  (:meth:`EdgeAccumulator.degrees_for`). Buffers are reused per thread.
  The buckets, in pre-id order, are the sorted edges, so a writer can
  stream them out while later buckets sort.

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
import threading
from collections import deque
from concurrent.futures import ThreadPoolExecutor

import numpy as np

from connectome.backend import get_xp, to_numpy
from connectome.errors import InputError
from connectome.graph._ids import IdIndex

EDGE_COLUMNS = ("pre_id", "post_id", "n_synapses", "total_size")
PIECE = 1 << 19  # smallest share of one add() a thread packs on its own
BUCKET = 1 << 14  # aim of the radix partition: words per bucket
RADIX_BITS = 12  # widest digit of one LSD pass (a 4096-entry histogram stays in L1)
GROUP = 1 << 20  # words sorted by one task (a run of buckets): its edges are one piece of the result
DEGREE_SPACE = 1 << 22  # largest id space for the neurons' counts kept during the reduction
_CODE_SIZE, _CODE_ID = 1, 2  # problems the partition kernel reports
_PARTNER_SHIFT = 40  # a neuron's count word: synapses in the low 40 bits, partners above


@functools.cache
def _kernels():
    """Numba kernels of the CPU path, compiled (or loaded from cache) on first use."""
    import numba

    @numba.njit(nogil=True, cache=True)
    def partition(pre, post, size, has_size, keep, has_keep, id_limit, id_bits, size_bits, top_shift, n_buckets,
                  out, base, starts):  # pragma: no cover - compiled
        """Pack the kept synapses into ``out[base:]`` grouped by bucket; bucket ``b`` ends up in
        ``out[starts[b]:starts[b + 1]]`` (absolute positions). Returns (kept, largest size, problem)."""
        m = pre.shape[0]
        limit = np.uint64(id_limit)
        sh = np.uint64(top_shift)
        counts = np.zeros(n_buckets + 1, np.int64)
        for i in range(m):
            if has_keep and not keep[i]:
                continue
            p = np.uint64(pre[i])
            if p >= limit or np.uint64(post[i]) >= limit:
                return 0, 0, _CODE_ID
            counts[np.int64(p >> sh) + 1] += 1
        starts[0] = base
        for b in range(n_buckets):
            starts[b + 1] = starts[b] + counts[b + 1]
        pos = starts[:-1].copy()
        sp = np.uint64(id_bits + size_bits)
        sq = np.uint64(size_bits)
        biggest = np.int64(0)
        for i in range(m):
            if has_keep and not keep[i]:
                continue
            p = np.uint64(pre[i])
            w = (p << sp) | (np.uint64(post[i]) << sq)
            if has_size:
                s = np.int64(size[i])
                if s < 0:
                    return 0, s, _CODE_SIZE
                if s > biggest:
                    biggest = s
                w |= np.uint64(s)
            b = np.int64(p >> sh)
            out[pos[b]] = w
            pos[b] += 1
        return starts[n_buckets] - base, biggest, 0

    @numba.njit(nogil=True, cache=True)
    def sort_buckets(arena, starts, b0, b1, keys, tmp, size_bits, n_bits, radix_bits, id_bits, idmap, has_map,
                     deg, deg_in, has_deg, out_pre, out_post, out_cnt, out_sum):  # pragma: no cover - compiled
        """For each bucket ``b0 … b1 - 1``: gather it from every chunk (``starts``: one row per chunk)
        while counting its radix digits, sort it on ``n_bits`` key bits above ``size_bits``, and reduce
        the runs into ``out_*`` after the edges of the buckets before. Returns (edges, unassigned).
        (One function: Numba's cache misses every time on a call to another jitted closure.)"""
        n_pass = (n_bits + radix_bits - 1) // radix_bits if n_bits > 0 else 0
        width = (n_bits + n_pass - 1) // n_pass if n_pass > 0 else 1
        mask = np.uint64((1 << width) - 1)
        hist = np.zeros((max(n_pass, 1), 1 << width), np.int64)
        ss = np.uint64(size_bits)
        low = np.uint64((1 << size_bits) - 1)
        ib = np.uint64(id_bits)
        idm = np.uint64((1 << id_bits) - 1)
        k = 0
        unassigned = 0
        for b in range(b0, b1):
            hist[:] = 0
            m = 0
            for r in range(starts.shape[0]):
                for i in range(starts[r, b], starts[r, b + 1]):
                    w = arena[i]
                    keys[m] = w
                    m += 1
                    for d in range(n_pass):
                        hist[d, np.int64((w >> np.uint64(size_bits + d * width)) & mask)] += 1
            src = keys
            dst = tmp
            for d in range(n_pass):
                h = hist[d]
                constant = False
                for x in range(1 << width):
                    if h[x] == m:
                        constant = True
                        break
                if constant:
                    continue
                total = 0
                for x in range(1 << width):
                    c = h[x]
                    h[x] = total
                    total += c
                sh = np.uint64(size_bits + d * width)
                for i in range(m):
                    w = src[i]
                    x = np.int64((w >> sh) & mask)
                    dst[h[x]] = w
                    h[x] += 1
                src, dst = dst, src
            first = k
            i = 0
            while i < m:
                h0 = src[i] >> ss
                c = 0
                s = 0
                while i < m and (src[i] >> ss) == h0:
                    s += np.int64(src[i] & low)
                    c += 1
                    i += 1
                p = h0 >> ib
                q = h0 & idm
                if p == 0 or q == 0:
                    unassigned += c
                    continue
                out_pre[k] = p
                out_post[k] = q
                out_cnt[k] = c
                out_sum[k] = s
                k += 1
            if has_deg:  # loops of their own: the reduction above stays tight
                for j in range(first, k):
                    deg[np.int64(out_pre[j])] += out_cnt[j] + (1 << _PARTNER_SHIFT)
                    deg_in[np.int64(out_post[j])] += out_cnt[j] + (1 << _PARTNER_SHIFT)
            if has_map:
                for j in range(first, k):
                    out_pre[j] = idmap[np.int64(out_pre[j])]
                    out_post[j] = idmap[np.int64(out_post[j])]
        return k, unassigned

    return partition, sort_buckets


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
        About how many synapses will be added (sizes the radix partition
        and the arena of packed words: 8 bytes a synapse on the fast path;
        more may be added, at the cost of another arena).
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

    Notes
    -----
    :meth:`add` may be called from several threads at once (each call
    packs its chunk on the calling thread when ``threads=1`` is passed).
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
        self.max_index = len(self.ids) - 1 if self.index is not None else max(0, int(max_id))
        self.packed = 2 * id_bits + self.size_bits <= 64
        self.n = 0
        self.unassigned = 0
        n_rows = max(0, int(n_rows))
        self.n_rows = n_rows
        self.threads = max(1, threads or os.cpu_count() or 1)
        k = 0
        if xp is np and self.packed:
            k = min(12, self.id_bits, max(0, int(np.ceil(np.log2(max(n_rows, 1) / BUCKET)))))
        self.bucket_bits = k
        self.top_shift = self.id_bits - k  # pre >> top_shift = bucket
        self._lock = threading.Lock()
        self._segments: list = []  # CPU: arenas of packed words, [array, used]
        self._pieces: list = []  # CPU: (segment, bucket starts) of each chunk
        self.words: list = []  # GPU: packed words
        self._degrees = None
        if not self.packed:  # sizes too large for the packed word: keep columns
            self.parts: list = []

    # ------------------------------------------------------------------ adding
    def add(self, pre, post, size=None, *, keep=None, threads: int | None = None) -> None:
        """Add a chunk of synapses (``pre``/``post`` neuron ids, ``size``).

        Parameters
        ----------
        pre, post : (m,) integer arrays
        size : (m,) integer array, optional
        keep : (m,) bool array, optional
            Add only these synapses (e.g. a score threshold), without a copy.
        threads : int, optional
            Threads packing this chunk (default: the accumulator's); pass 1
            when several threads call :meth:`add` at once.
        """
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
        if keep is not None:
            keep = xp.asarray(keep)
            if keep.dtype != bool or keep.shape != (m,):
                raise InputError(f"keep must be a boolean mask of {m} values, got {keep.dtype} of shape {keep.shape}")
            if xp is not np or not self.packed or self.index is not None:  # filter first: no look-up of ids left out
                pre, post = pre[keep], post[keep]
                size = size[keep] if size is not None else None
                m = int(pre.shape[0])
                keep = None
        threads = self.threads if threads is None else max(1, int(threads))
        if self.index is not None:
            pre, post = self._dense(pre, threads), self._dense(post, threads)
        if not self.packed:
            part = (to_numpy(pre).astype(np.uint64), to_numpy(post).astype(np.uint64),
                    np.zeros(m, np.int64) if size is None else to_numpy(size).astype(np.int64))
            with self._lock:
                self.parts.append(part)
                self.n += m
            return
        if m == 0:
            return
        if xp is np:
            kept = self._add_cpu(pre, post, size, keep, threads)
        else:
            self._add_gpu(pre, post, size)
            kept = m
        with self._lock:
            self.n += kept

    def _check_size(self, biggest: int) -> None:
        limit = 1 << self.size_bits
        if biggest >= limit:
            if self.size_bits == 0:
                raise InputError("synapse sizes were announced as absent (max_size=0) but some are positive")
            raise InputError(f"synapse size {biggest} exceeds the announced maximum {limit - 1}")

    def _reserve(self, m: int):
        """A segment and the first place of ``m`` free words in it (thread-safe)."""
        with self._lock:
            if self._segments and self._segments[-1][1] + m <= self._segments[-1][0].shape[0]:
                seg = self._segments[-1]
            else:  # a new arena: what is still expected, at least this chunk (pages are touched as they fill)
                used = sum(s[1] for s in self._segments)
                seg = [np.empty(max(m, self.n_rows - used, 1 << 16), np.uint64), 0]
                self._segments.append(seg)
            base = seg[1]
            seg[1] += m
            return seg, base

    def _add_cpu(self, pre, post, size, keep, threads) -> int:
        partition, _ = _kernels()
        pre = np.ascontiguousarray(pre)
        post = np.ascontiguousarray(post)
        has_size = size is not None
        size = np.ascontiguousarray(size) if has_size else np.zeros(1, np.int64)
        has_keep = keep is not None
        keep = np.ascontiguousarray(keep) if has_keep else np.zeros(1, bool)
        nb = 1 << self.bucket_bits
        m = pre.shape[0]
        parts = max(1, min(threads, m // max(PIECE, 1)))
        bounds = np.linspace(0, m, parts + 1).astype(np.int64)

        def work(j):
            a, b = int(bounds[j]), int(bounds[j + 1])
            seg, base = self._reserve(b - a)
            starts = np.empty(nb + 1, np.int64)
            kept, biggest, problem = partition(pre[a:b], post[a:b], size[a:b] if has_size else size, has_size,
                                               keep[a:b] if has_keep else keep, has_keep, self.max_index + 1,
                                               self.id_bits,
                                               self.size_bits, self.top_shift, nb, seg[0], base, starts)
            return seg, starts, int(kept), int(biggest), int(problem)

        if parts > 1:
            with ThreadPoolExecutor(parts) as pool:
                done = list(pool.map(work, range(parts)))
        else:
            done = [work(0)]
        for _, _, _, biggest, problem in done:
            if problem == _CODE_ID:
                raise InputError(f"a neuron id exceeds the announced maximum {self.max_index}")
            if problem == _CODE_SIZE:
                raise InputError(f"size must be non-negative, found {biggest}")
        self._check_size(max(d[3] for d in done))
        with self._lock:
            self._pieces.extend((seg, starts) for seg, starts, _, _, _ in done)
        return sum(d[2] for d in done)

    def _add_gpu(self, pre, post, size) -> None:
        xp = self.xp
        word = pre.astype(xp.uint64) << xp.uint64(self.id_bits + self.size_bits)
        word |= post.astype(xp.uint64) << xp.uint64(self.size_bits)
        if size is not None:
            self._check_size(int(size.max()))
            word |= size.astype(xp.uint64)
        with self._lock:
            self.words.append(word)

    def _dense(self, ids, threads: int = 1):
        idx = self.index.lookup(to_numpy(ids), threads=threads)
        if np.any(idx < 0):
            k = int(np.argmax(idx < 0))
            raise InputError(f"{int(np.sum(idx < 0))} synapses name neurons that are not in the neuron table, "
                             f"e.g. {int(to_numpy(ids)[k])}")
        return self.xp.asarray(idx)

    # ------------------------------------------------------------------ result
    def result(self) -> dict:
        """The edges: columns ``pre_id, post_id, n_synapses, total_size``, sorted by (pre_id, post_id)."""
        chunks = list(self.iter_result())
        xp = self.xp
        if not chunks:
            return {"pre_id": xp.zeros(0, xp.uint64), "post_id": xp.zeros(0, xp.uint64),
                    "n_synapses": xp.zeros(0, xp.int64), "total_size": xp.zeros(0, xp.int64)}
        if len(chunks) == 1:
            return chunks[0]
        return {k: xp.concatenate([c[k] for c in chunks]) for k in EDGE_COLUMNS}

    def iter_result(self, *, lookahead: int | None = None):
        """The edges in pieces, in (pre_id, post_id) order: dicts of :data:`EDGE_COLUMNS` arrays.

        On the CPU the pieces are the radix buckets, sorted on the thread pool
        at most ``lookahead`` (default: 4 per thread) ahead of the consumer,
        so a consumer that writes them out overlaps with the sorting.
        """
        if not self.packed:
            yield self._result_unpacked()
            return
        xp = self.xp
        if xp is not np:
            words, self.words = self.words, []
            keys = words[0] if len(words) == 1 else (xp.concatenate(words) if words else xp.zeros(0, xp.uint64))
            del words
            keys.sort()
            if keys.shape[0]:
                hi, counts, sums = self._reduce_whole(keys)
                del keys
                id_mask = xp.uint64((1 << self.id_bits) - 1)
                yield self._finish(hi >> xp.uint64(self.id_bits), hi & id_mask, counts, sums)
            return
        yield from self._iter_cpu(lookahead)

    def _iter_cpu(self, lookahead):
        _, sort_buckets = _kernels()
        pieces, self._pieces = self._pieces, []
        segments, self._segments = self._segments, []
        self.unassigned = 0
        nb = 1 << self.bucket_bits
        if not pieces:
            return
        if len(segments) == 1:
            arena = segments[0][0]
            table = np.stack([starts for _, starts in pieces])
        else:  # more synapses than announced: one arena after all (a copy)
            offset, at = {}, 0
            for seg in segments:
                offset[id(seg)] = at
                at += seg[1]
            arena = np.concatenate([seg[0][:seg[1]] for seg in segments])
            table = np.stack([starts + offset[id(seg)] for seg, starts in pieces])
        del segments, pieces
        sizes = (table[:, 1:] - table[:, :-1]).sum(axis=0)
        if not sizes.any():
            return
        biggest = int(sizes.max())
        # tasks: runs of consecutive buckets of about GROUP words (fewer, larger pieces for the consumer)
        bounds = [0]
        acc_words = 0
        for b in range(nb):
            acc_words += int(sizes[b])
            if acc_words >= GROUP and b + 1 < nb:
                bounds.append(b + 1)
                acc_words = 0
        bounds.append(nb)
        groups = [(a, b) for a, b in zip(bounds[:-1], bounds[1:]) if sizes[a:b].sum()]
        n_bits = 2 * self.id_bits - self.bucket_bits  # the bucket's top bits are all equal
        space = self.max_index + 1
        has_deg = self.keeps_degrees
        has_map = self.index is not None
        idmap = self.ids if has_map else np.zeros(1, np.uint64)
        local = threading.local()
        degrees = []

        def work(group):
            a, b = group
            buf = getattr(local, "buf", None)
            if buf is None:
                deg = np.zeros((2, space if has_deg else 1), np.int64)  # outputs, inputs (+ partners << 40)
                with self._lock:
                    degrees.append(deg)
                buf = local.buf = (np.empty(biggest, np.uint64), np.empty(biggest, np.uint64), deg)
            keys, tmp, deg = buf
            m = int(sizes[a:b].sum())
            out = (np.empty(m, np.uint64), np.empty(m, np.uint64), np.empty(m, np.int64), np.empty(m, np.int64))
            k, unassigned = sort_buckets(arena, table, a, b, keys, tmp, self.size_bits, n_bits, RADIX_BITS,
                                       self.id_bits, idmap, has_map, deg[0], deg[1], has_deg, *out)
            k = int(k)
            return dict(zip(EDGE_COLUMNS, (o[:k] for o in out))), int(unassigned)

        lookahead = max(1, lookahead or 2 * self.threads)
        workers = min(self.threads, len(groups))
        with ThreadPoolExecutor(workers) as pool:
            pending = deque()
            it = iter(groups)
            for g in it:
                pending.append(pool.submit(work, g))
                if len(pending) >= lookahead:
                    break
            try:
                while pending:
                    chunk, unassigned = pending.popleft().result()
                    nxt = next(it, None)
                    if nxt is not None:
                        pending.append(pool.submit(work, nxt))
                    self.unassigned += unassigned
                    if chunk["pre_id"].shape[0]:
                        yield chunk
            finally:
                for f in pending:
                    f.cancel()
        del arena, table
        if has_deg:
            total = degrees[0]
            for d in degrees[1:]:
                total += d
            low = np.int64((1 << _PARTNER_SHIFT) - 1)
            # (space, 4): n_outputs, n_inputs, n_downstream, n_upstream
            self._degrees = np.stack([total[0] & low, total[1] & low, total[0] >> _PARTNER_SHIFT,
                                      total[1] >> _PARTNER_SHIFT], axis=1)

    @property
    def keeps_degrees(self) -> bool:
        """Whether :meth:`iter_result` counts the neurons' synapses and partners as it goes."""
        return self.xp is np and self.packed and self.max_index < DEGREE_SPACE

    def edge_neurons(self) -> np.ndarray:
        """Sorted ids of the neurons named by the edges of the last :meth:`iter_result` (CPU path)."""
        if self._degrees is None:
            raise InputError("the neurons' counts were not kept (see keeps_degrees)")
        found = np.flatnonzero((self._degrees[:, 0] > 0) | (self._degrees[:, 1] > 0))
        return self.ids[found] if self.index is not None else found.astype(np.uint64)

    def degrees_for(self, neuron_ids) -> dict | None:
        """Synapse and partner counts of neurons, from the edges of the last :meth:`iter_result`.

        Parameters
        ----------
        neuron_ids : (n,) uint64 array

        Returns
        -------
        dict of (n,) int64 arrays or None
            ``n_outputs, n_inputs`` (synapses) and ``n_downstream,
            n_upstream`` (partners), as :func:`connectome.graph.with_degrees`
            computes them; None where they were not kept (GPU, very large
            raw ids, sizes that need the unpacked path).

        Raises
        ------
        InputError
            An edge names a neuron that ``neuron_ids`` does not list.
        """
        if self._degrees is None:
            return None
        deg = self._degrees.T  # (4, space): n_outputs, n_inputs, n_downstream, n_upstream
        ids = np.asarray(neuron_ids).astype(np.uint64, copy=False)
        if self.index is not None:
            pos = self.index.lookup(ids).astype(np.int64)
        else:
            inside = ids < np.uint64(deg.shape[1])
            pos = np.where(inside, ids, np.uint64(0)).view(np.int64)
            pos[~inside] = -1
        found = pos > 0  # position 0 is "unassigned": never counted
        cols = np.zeros((4, ids.size), np.int64)
        cols[:, found] = deg[:, pos[found]]
        if int(cols[0].sum()) != int(deg[0].sum()) or int(cols[1].sum()) != int(deg[1].sum()):
            seen = np.zeros(deg.shape[1], bool)
            seen[pos[found]] = True
            missing = np.flatnonzero(((deg[0] > 0) | (deg[1] > 0)) & ~seen)
            k = int(missing[0])
            name = int(self.ids[k]) if self.index is not None else k
            raise InputError(f"edges name neuron {name}, which the neuron table does not list")
        return dict(zip(("n_outputs", "n_inputs", "n_downstream", "n_upstream"), cols))

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
    One radix sort of one packed 64-bit word per synapse (see the module
    notes; the partition-then-sort-in-cache scheme of Satish et al., "Fast
    sort on CPUs and GPUs", SIGMOD 2010); equivalent to ``SELECT pre_id,
    post_id, count(*), sum(size) … WHERE pre_id <> 0 AND post_id <> 0 GROUP
    BY pre_id, post_id ORDER BY pre_id, post_id``.

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
