"""Neuron id → dense index (0 … n-1) in vectorised O(1) per lookup.

Neuron ids are whatever the segmentation or the imported table uses: small
consecutive integers from our own labeling, or 64-bit root ids (FlyWire,
CAVE). Every graph kernel works on dense indices, so the mapping runs over
tens of millions of synapse ids at a time. ``np.searchsorted`` costs
``log2(n)`` dependent, cache-missing steps per value; instead:

* ids no larger than a few times ``n`` use a direct table ``index[id]``;
* any other ids use an open-addressing hash table (multiply-shift hash,
  linear probing, load factor ≤ 1/4), probed by a compiled (Numba) loop
  that releases the GIL, large inputs split over threads; without Numba,
  one vectorised round per probe step (most values resolve in the first
  round).
"""

from __future__ import annotations

import functools
import os
from concurrent.futures import ThreadPoolExecutor

import numpy as np

from connectome.errors import InputError

_GOLDEN = np.uint64(0x9E3779B97F4A7C15)
_DIRECT_MAX = 1 << 24  # ids below this (or below 8 n) use a direct table
_PIECE = 1 << 18  # values looked up at a time
_THREAD_MIN = 1 << 20  # values per thread, at least, in a threaded lookup


@functools.cache
def _probe_kernel():
    """Compiled hash probe (None without Numba)."""
    try:
        import numba
    except ImportError:  # pragma: no cover - numba is a dependency
        return None

    @numba.njit(nogil=True, cache=True)
    def probe(values, table, ids, bits, mask, out):  # pragma: no cover - compiled
        g = np.uint64(0x9E3779B97F4A7C15)
        sh = np.uint64(64 - bits)
        for i in range(values.shape[0]):
            v = values[i]
            s = np.int64((v * g) >> sh)
            while True:
                p = table[s]
                if p < 0:
                    out[i] = -1
                    break
                if ids[p] == v:
                    out[i] = p
                    break
                s = (s + 1) & mask

    return probe


@functools.cache
def _set_kernel():
    """Compiled insertion into an open-addressing hash set of non-zero uint64 values (0 = empty slot)."""
    import numba

    @numba.njit(nogil=True, cache=True)
    def insert(values, start, table, bits, count, limit):  # pragma: no cover - compiled
        g = np.uint64(0x9E3779B97F4A7C15)
        sh = np.uint64(64 - bits)
        mask = np.int64((1 << bits) - 1)
        for i in range(start, values.shape[0]):
            v = np.uint64(values[i])
            if v == 0:
                continue
            s = np.int64((v * g) >> sh)
            while True:
                t = table[s]
                if t == v:
                    break
                if t == 0:
                    table[s] = v
                    count += 1
                    if count >= limit:  # full enough: the caller grows the table and resumes here
                        return count, i + 1
                    break
                s = (s + 1) & mask
        return count, values.shape[0]

    return insert


def unique_ids(chunks) -> np.ndarray:
    """Sorted distinct non-zero ids of a stream of id arrays, without holding the stream.

    Parameters
    ----------
    chunks : iterable of (m,) integer arrays
        E.g. the ``pre_id`` and ``post_id`` columns of a synapse file, row
        group by row group.

    Returns
    -------
    (n,) uint64 array

    Notes
    -----
    An open-addressing hash set (multiply-shift hash, linear probing, load
    factor ≤ 1/2, grown by doubling) filled by a compiled loop: memory and
    time grow with the number of distinct ids, not with the stream, unlike
    ``np.unique`` of the concatenated columns (a sort of all of them).

    Examples
    --------
    >>> unique_ids([np.array([5, 0, 3]), np.array([3, 2**60])]).tolist()
    [3, 5, 1152921504606846976]
    """
    insert = _set_kernel()
    bits = 12
    table = np.zeros(1 << bits, np.uint64)
    count = 0
    for values in chunks:
        values = np.asarray(values)
        if values.dtype.kind == "i":
            if values.size and values.min() < 0:
                raise InputError(f"neuron ids must be non-negative, found {int(values.min())}")
        elif values.dtype.kind != "u":
            raise InputError(f"neuron ids must be integers, got dtype {values.dtype}")
        values = np.ascontiguousarray(values).reshape(-1)
        at = 0
        while at < values.size:
            count, at = insert(values, at, table, bits, count, (1 << bits) // 2)
            if count >= (1 << bits) // 2:
                old = table[table != 0]
                bits += 1
                table = np.zeros(1 << bits, np.uint64)
                count, _ = insert(old, 0, table, bits, 0, 1 << bits)
    return np.sort(table[table != 0])


class IdIndex:
    """Positions of neuron ids in a sorted, unique id array.

    Parameters
    ----------
    ids : (n,) array of unsigned or non-negative integers
        Sorted, unique neuron ids (0 is allowed but the graph never uses it).

    Examples
    --------
    >>> index = IdIndex(np.array([3, 10, 720575940612345678], np.uint64))
    >>> index.lookup(np.array([10, 4, 720575940612345678], np.uint64))
    array([ 1, -1,  2])
    """

    def __init__(self, ids):
        ids = np.asarray(ids)
        if ids.dtype.kind == "i":
            if ids.size and ids.min() < 0:
                raise InputError(f"neuron ids must be non-negative, found {int(ids.min())}")
            ids = ids.astype(np.uint64)
        elif ids.dtype.kind != "u":
            raise InputError(f"neuron ids must be integers, got dtype {ids.dtype}")
        self.ids = np.ascontiguousarray(ids, dtype=np.uint64)
        n = self.ids.size
        if n > 1 and not bool(np.all(self.ids[1:] > self.ids[:-1])):
            raise InputError("neuron ids must be sorted and unique")
        self.n = n
        self.max_id = int(self.ids[-1]) if n else 0
        if self.max_id < max(_DIRECT_MAX, 8 * n):
            self._direct = np.full(self.max_id + 2, -1, np.int64 if n >= 2**31 else np.int32)
            self._direct[self.ids.astype(np.intp)] = np.arange(n)
            self._table = None
        else:
            self._direct = None
            self._build_hash()

    # ------------------------------------------------------------- hashing
    def _slots(self, values: np.ndarray) -> np.ndarray:
        h = values * _GOLDEN  # wraps modulo 2**64 by design
        h >>= np.uint64(64 - self._bits)
        return h.view(np.int64)  # < 2**63: a free reinterpretation (astype would copy slowly)

    def _build_hash(self) -> None:
        self._bits = max(4, int(np.ceil(np.log2(max(self.n, 1) * 4))))
        size = 1 << self._bits
        mask = size - 1
        table = np.full(size, -1, np.int64)
        slots = self._slots(self.ids).copy()
        todo = np.arange(self.n, dtype=np.int64)
        while todo.size:
            s = slots[todo]
            free = table[s] == -1
            cand, cs = todo[free], s[free]
            table[cs] = cand  # among candidates for one slot, the last write wins
            won = table[cs] == cand
            todo = np.concatenate([todo[~free], cand[~won]])
            slots[todo] = (slots[todo] + 1) & mask
        self._table = table.astype(np.int32) if self.n < 2**31 else table
        self._mask = mask
        # an empty slot (-1) reads the last entry: ids[0], which an empty slot can never
        # hide (its probe chain from its home slot is fully occupied)
        self._ids_ext = np.append(self.ids, self.ids[:1])

    # ------------------------------------------------------------- lookups
    def lookup(self, values, *, threads: int | None = None) -> np.ndarray:
        """Dense index of each value; ``-1`` where the value is not an id.

        Parameters
        ----------
        values : (m,) integer array
        threads : int, optional
            Threads of the compiled hash probe (default: the CPU count, for
            inputs of a million values or more); pass 1 from a worker thread.

        Returns
        -------
        (m,) int32 array (int64 beyond 2**31 neurons)
        """
        values = np.asarray(values)
        if values.dtype.kind == "i":
            if values.size and values.min() < 0:
                values = np.where(values < 0, np.iinfo(np.int64).max, values)
            values = values.astype(np.uint64)
        elif values.dtype.kind != "u":
            raise InputError(f"neuron ids must be integers, got dtype {values.dtype}")
        values = np.ascontiguousarray(values, dtype=np.uint64).reshape(-1)
        if self.n == 0:
            return np.full(values.shape, -1, np.int32)
        if self._direct is None and _probe_kernel() is not None:
            return self._lookup_compiled(values, threads)
        if values.size > _PIECE:  # in pieces: the temporaries stay in cache
            out = np.empty(values.shape, self._direct.dtype if self._direct is not None else self._table.dtype)
            for lo in range(0, values.size, _PIECE):
                out[lo:lo + _PIECE] = self.lookup(values[lo:lo + _PIECE])
            return out
        if self._direct is not None:
            capped = np.minimum(values, np.uint64(self.max_id + 1)).view(np.int64)
            return np.take(self._direct, capped)
        s = self._slots(values)
        p = np.take(self._table, s)
        hit = np.take(self._ids_ext, p) == values
        out = np.where(hit, p, p.dtype.type(-1))
        todo = np.flatnonzero(~hit & (p >= 0))
        s = s[todo]
        while todo.size:
            s = (s + 1) & self._mask
            p = np.take(self._table, s)
            hit = np.take(self._ids_ext, p) == values[todo]
            out[todo[hit]] = p[hit]
            more = ~hit & (p >= 0)
            todo, s = todo[more], s[more]
        return out

    def _lookup_compiled(self, values: np.ndarray, threads: int | None = None) -> np.ndarray:
        probe = _probe_kernel()
        out = np.empty(values.shape, self._table.dtype)
        parts = max(1, min(threads or os.cpu_count() or 1, values.size // _THREAD_MIN))
        if parts == 1:
            probe(values, self._table, self.ids, self._bits, self._mask, out)
            return out
        bounds = np.linspace(0, values.size, parts + 1).astype(np.int64)
        with ThreadPoolExecutor(parts) as pool:
            jobs = [pool.submit(probe, values[a:b], self._table, self.ids, self._bits, self._mask, out[a:b])
                    for a, b in zip(bounds[:-1], bounds[1:])]
            for job in jobs:
                job.result()
        return out

    def position(self, value) -> int:
        """Dense index of one id, or -1."""
        try:
            v = int(value)
        except (TypeError, ValueError):
            return -1
        if v < 0 or v > self.max_id:
            return -1
        i = int(np.searchsorted(self.ids, np.uint64(v)))
        return i if i < self.n and int(self.ids[i]) == v else -1

    def __len__(self) -> int:
        return self.n
