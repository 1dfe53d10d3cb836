"""The ``graph`` stage: neurons, synapse partners and edges, over a store.

Three steps, each resumable and recorded in ``provenance.json``:

``graph.neurons``
    ``em/segmentation`` → ``graph/neurons.parquet`` (size, centroid, box).
    One task per block (a whole number of chunks) computes partial
    statistics (:func:`connectome.graph.block_statistics`) and saves them in
    ``_graph_scratch/neurons/``; a re-run skips saved blocks; the partials
    merge exactly, so the table does not depend on the block shape.
``graph.synapses``
    An external synapse table (CSV/Parquet, points in level-0 voxels or nm)
    → ``em/synapses.parquet`` with ``pre_id``/``post_id`` read from
    ``em/segmentation`` at the rounded points. Points are grouped by the
    chunk that holds them and only those chunks are read (one task per
    group of chunks).
``graph.edges``
    ``em/synapses.parquet`` → ``graph/edges.parquet``, streamed by row
    groups into :class:`connectome.graph.EdgeAccumulator` (one packed word per
    synapse, sorted once), plus the synapse and partner counts of every
    neuron in ``graph/neurons.parquet``.

Outputs are written whole and atomically (temporary file, then rename): an
interrupted run never leaves a table that looks finished.
"""

from __future__ import annotations

import contextlib
import functools
import gc
import hashlib
import json
import math
import os
import shutil
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import dask
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import zarr

from connectome.backend import resolve_device, to_device
from connectome.errors import InputError, StageError, StoreError
from connectome.graph import (
    EdgeAccumulator,
    block_statistics,
    group_by_chunk,
    lookup_points,
    merge_statistics,
    neuron_table,
    read_synapse_table,
    voxel_points,
    with_degrees,
)
from connectome.graph import _store as st
from connectome.graph._aggregate import EDGE_COLUMNS
from connectome.graph._ids import unique_ids
from connectome.graph._imports import set_degrees
from connectome.graph._points import SYNAPSE_COLUMNS, check_inside
from connectome.io import Dataset
from workflows.blockwise import Block, block_grid
from workflows.cluster import Executor
from workflows.progress import progress

SEGMENTATION = "em/segmentation"
SCRATCH = "_graph_scratch"
_BLOCK_VOXELS = 1 << 23  # default block: about 8 M voxels (64 MB of uint64 labels)
_CHUNKS_PER_TASK = 32


def _segmentation(ds: Dataset, name: str, why: str = "") -> zarr.Array:
    """The complete label image ``name``, or a one-line error (``why`` says what needs it)."""
    if name not in ds:
        raise StageError(f"{ds.path}: no {name}{why}; run the segmentation stages first (or bring your own {name})")
    if not ds.is_complete(name):
        raise StageError(f"{ds.path}: {name} is incomplete (its stage was interrupted); finish that stage first")
    arr = ds.array(name)
    if arr.ndim != 3 or np.dtype(arr.dtype).kind not in "ui":
        raise StoreError(f"{ds.path}/{name}: expected a 3-D integer label image, found {arr.ndim}-D {arr.dtype}")
    return arr


def default_block_shape(shape, chunks, voxels: int = _BLOCK_VOXELS) -> tuple[int, ...]:
    """Whole chunks, grown axis by axis (last axes first) to about ``voxels``."""
    block = [min(int(c), int(s)) for c, s in zip(chunks, shape)]
    grown = True
    while grown and math.prod(block) * 2 <= voxels:
        grown = False
        for ax in reversed(range(len(block))):
            if block[ax] < shape[ax] and math.prod(block) * 2 <= voxels:
                block[ax] = min(block[ax] * 2, int(shape[ax]))
                grown = True
    return tuple(block)


# ---------------------------------------------------------------- neurons
def _neuron_block(store: str, path: str, block: Block, out: str, device: str) -> int:
    arr = zarr.open_array(f"{store}/{path}", mode="r")
    labels = arr[block.core]
    if device == "gpu":
        labels = to_device(labels, "gpu")
    stats = block_statistics(labels, tuple(s.start for s in block.core))
    tmp = f"{out}.tmp-{os.getpid()}.npz"
    np.savez(tmp, **stats)
    os.replace(tmp, out)
    return int(len(stats["neuron_id"]))


def _signature(obj) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:16]


def neuron_statistics(ds: Dataset, *, segmentation: str = SEGMENTATION, block_shape=None,
                      executor: Executor | None = None, device: str = "cpu", overwrite: bool = False,
                      show_progress: bool | None = None) -> pa.Table:
    """Write ``graph/neurons.parquet`` from a segmentation, blockwise.

    Parameters
    ----------
    ds : Dataset
    segmentation : str
        Label image (a multiscale group stands for its level 0).
    block_shape : tuple of 3 int, optional
        A whole number of chunks; default about 8 M voxels.
    executor : Executor, optional
        From :func:`workflows.cluster.executor`; default threads.
    device : {'cpu', 'gpu', 'auto'}
        Where the per-block kernel runs.

    Returns
    -------
    pyarrow.Table
        ``neuron_id, n_voxels, z, y, x, z_min … x_max``.
    """
    t0 = time.perf_counter()
    stage = "graph.neurons"
    device = resolve_device(device)
    executor = executor or Executor(None)
    arr = _segmentation(ds, segmentation)
    shape, chunks = tuple(arr.shape), tuple(arr.chunks)
    block_shape = tuple(block_shape) if block_shape is not None else default_block_shape(shape, chunks)
    if len(block_shape) != 3 or any(int(b) <= 0 for b in block_shape):
        raise InputError(f"block shape must be 3 positive sizes, got {block_shape}")
    bad = [(b, c) for b, c, s in zip(block_shape, chunks, shape) if b % c and b < s]
    if bad:
        raise InputError(f"block shape {block_shape} is not a multiple of the chunks {chunks} of {segmentation}")
    zjson = ds.path / arr.path / "zarr.json"
    params = {"segmentation": segmentation, "shape": shape, "chunks": chunks, "block_shape": block_shape,
              "written": zjson.stat().st_mtime_ns if zjson.exists() else None}
    params = json.loads(json.dumps(params))  # as provenance.json will give it back (lists, not tuples)
    prev = ds.provenance.get(stage)
    if (not overwrite and prev and prev.get("status") == "done" and prev.get("parameters") == params
            and ds.has_table(st.NEURONS)):
        return st.read_store_table(ds, st.NEURONS, st.NEURON_REQUIRED)
    scratch = ds.path / SCRATCH / "neurons"
    sig = _signature(params)
    if scratch.exists() and (overwrite or not (scratch / f"signature-{sig}").exists()):
        shutil.rmtree(scratch)
    scratch.mkdir(parents=True, exist_ok=True)
    (scratch / f"signature-{sig}").touch()
    blocks = block_grid(shape, block_shape)
    ds.provenance.begin(stage, parameters=params, device=device, blocks_total=len(blocks))
    todo = [b for b in blocks if not (scratch / f"block-{b.linear}.npz").exists()]
    tasks = [dask.delayed(_neuron_block, pure=False)(str(ds.path), arr.path, b, str(scratch / f"block-{b.linear}.npz"),
                                                     device, dask_key_name=f"{stage}-{b.linear}") for b in todo]
    with progress(stage, len(blocks), enabled=show_progress) as advance:
        advance(len(blocks) - len(todo))
        try:
            executor.run(tasks, lambda _: advance())
        except BaseException:
            ds.provenance.update(stage, status="failed")
            raise
    parts = []
    for b in blocks:
        with np.load(scratch / f"block-{b.linear}.npz") as f:
            parts.append({k: f[k] for k in f.files})
    merged = neuron_table(merge_statistics(parts))
    table = pa.table({k: pa.array(v) for k, v in merged.items()})
    if ds.has_table(st.EDGES):  # keep the synapse counts of a graph built before
        edges = st.read_store_table(ds, st.EDGES, st.EDGE_REQUIRED)
        try:
            table = with_degrees(table, edges.column("pre_id").to_numpy(), edges.column("post_id").to_numpy(),
                                 edges.column("n_synapses").to_numpy())
        except StoreError:
            ds.table_path(st.EDGES).unlink()  # edges of another segmentation: stale
    st.write_table(ds, st.NEURONS, table, sorting=["neuron_id"])
    shutil.rmtree(scratch)
    if not any((ds.path / SCRATCH).iterdir()):
        (ds.path / SCRATCH).rmdir()
    ds.provenance.end(stage, n_neurons=table.num_rows, seconds=round(time.perf_counter() - t0, 3),
                      blocks_done=len(blocks))
    return table


# ---------------------------------------------------------------- synapses
def _lookup_task(store: str, path: str, chunk_index: np.ndarray, chunks, groups: list) -> list:
    """Labels at the points of each chunk: reads exactly those chunks."""
    arr = zarr.open_array(f"{store}/{path}", mode="r")
    out = []
    for idx, (point_ids, local) in zip(chunk_index, groups):
        region = tuple(slice(int(i) * c, min((int(i) + 1) * c, s)) for i, c, s in zip(idx, chunks, arr.shape))
        try:
            block = arr[region]
        except Exception as e:
            where = ", ".join(f"{r.start}:{r.stop}" for r in region)
            raise StoreError(f"cannot read {path}[{where}] ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})") from None
        out.append((point_ids, np.asarray(lookup_points(block, local))))
    return out


def assign_points(ds: Dataset, points: np.ndarray, *, segmentation: str = SEGMENTATION,
                  executor: Executor | None = None, show_progress: bool | None = None) -> tuple[np.ndarray, int]:
    """Segment ids at (n, 3) voxel points, reading only the chunks that hold points.

    Returns the ids (uint64) and the number of chunks read.
    """
    executor = executor or Executor(None)
    arr = _segmentation(ds, segmentation)
    chunks, shape = tuple(int(c) for c in arr.chunks), tuple(int(s) for s in arr.shape)
    chunk_index, order, bounds = group_by_chunk(points, chunks, shape)
    labels = np.zeros(points.shape[0], np.uint64)
    tasks = []
    for lo in range(0, chunk_index.shape[0], _CHUNKS_PER_TASK):
        hi = min(lo + _CHUNKS_PER_TASK, chunk_index.shape[0])
        groups = []
        for k in range(lo, hi):
            ids = order[bounds[k]:bounds[k + 1]]
            groups.append((ids, points[ids] - chunk_index[k] * np.asarray(chunks)))
        tasks.append(dask.delayed(_lookup_task, pure=False)(str(ds.path), arr.path, chunk_index[lo:hi], chunks, groups))
    with progress("graph.synapses", len(tasks), enabled=show_progress) as advance:
        for result in executor.run(tasks, lambda _: advance()):
            for ids, lab in result:
                labels[ids] = lab
    return labels, int(chunk_index.shape[0])


def _source_signature(source) -> dict:
    if isinstance(source, (str, Path)) and Path(source).is_file():
        p = Path(source).resolve()
        s = p.stat()
        return {"source": str(p), "bytes": s.st_size, "mtime_ns": s.st_mtime_ns}
    return {"source": "table", "rows": getattr(source, "num_rows", None)}


def import_synapses(ds: Dataset, source, *, segmentation: str = SEGMENTATION, coordinates: str = "voxel",
                    executor: Executor | None = None, overwrite: bool = False,
                    show_progress: bool | None = None) -> dict:
    """Import external synapse detections into ``em/synapses.parquet``.

    Each synapse's ``pre_id`` / ``post_id`` is the segment at its rounded
    pre / post point in ``segmentation`` (0 where the point is background).
    Without a segmentation in the store, the table must carry ``pre_id`` and
    ``post_id`` itself (e.g. CAVE root ids) and they are used as given.

    Parameters
    ----------
    source : path or pyarrow.Table
        See :func:`connectome.graph.read_synapse_table`.
    coordinates : {'voxel', 'nm'}
        Units of the points (level-0 voxels, or nm of the segmentation's voxel size).

    Returns
    -------
    dict
        ``synapses, unassigned`` (a side in the background), ``autapses``
        (pre_id == post_id), ``chunks_read``, ``seconds``.
    """
    t0 = time.perf_counter()
    stage = "graph.synapses"
    params = {**_source_signature(source), "segmentation": segmentation, "coordinates": coordinates}
    prev = ds.provenance.get(stage)
    if ds.has_table(st.SYNAPSES) and not overwrite:
        if prev and prev.get("status") == "done" and prev.get("parameters") == params:
            return {k: prev.get(k) for k in ("synapses", "unassigned", "autapses", "chunks_read")} | {"seconds": 0.0}
        raise StoreError(f"{ds.path}: em/synapses.parquet exists (use --overwrite graph to replace it)")
    has_seg = segmentation in ds
    voxel_size = None
    if coordinates == "nm":
        try:
            voxel_size = ds.voxel_size
        except StoreError:
            raise InputError("coordinates in nm need the store's voxel size (a raw image)") from None
    table = read_synapse_table(source, coordinates=coordinates, voxel_size=voxel_size)
    n = table.num_rows
    chunks_read = 0
    if has_seg:
        arr = _segmentation(ds, segmentation)
        pts = {}
        for side in ("pre", "post"):
            p = voxel_points(np.stack([table.column(f"{side}_{a}").to_numpy() for a in "zyx"], axis=1))
            check_inside(p, arr.shape, table.column("synapse_id").to_numpy(), side, segmentation)
            pts[side] = p
        ds.provenance.begin(stage, parameters=params)
        labels, chunks_read = assign_points(ds, np.concatenate([pts["pre"], pts["post"]]), segmentation=segmentation,
                                            executor=executor, show_progress=show_progress)
        pre_id, post_id = labels[:n], labels[n:]
    else:
        raw = source if isinstance(source, pa.Table) else None
        if raw is None:
            from connectome.graph._points import read_table

            raw = read_table(source, f"synapse table {source}")
        if "pre_id" not in raw.column_names or "post_id" not in raw.column_names:
            raise StageError(f"{ds.path}: no {segmentation} to look the synapse points up in, and the table has no "
                             "pre_id/post_id columns")
        pre_id = st.id_column(raw, "pre_id", "synapse table")
        post_id = st.id_column(raw, "post_id", "synapse table")
        ds.provenance.begin(stage, parameters=params)
    cols = {c: table.column(c) for c in SYNAPSE_COLUMNS if c in table.column_names}
    cols["pre_id"] = pa.array(pre_id.astype(np.uint64))
    cols["post_id"] = pa.array(post_id.astype(np.uint64))
    out = pa.table({c: cols[c] for c in SYNAPSE_COLUMNS} | {c: table.column(c) for c in table.column_names
                                                           if c.startswith("center_")})
    st.write_table(ds, st.SYNAPSES, out, row_group_size=1 << 20)
    report = {"synapses": n, "unassigned": int(np.count_nonzero((pre_id == 0) | (post_id == 0))),
              "autapses": int(np.count_nonzero((pre_id == post_id) & (pre_id != 0))), "chunks_read": chunks_read}
    ds.provenance.end(stage, **report, seconds=round(time.perf_counter() - t0, 3))
    return report | {"seconds": time.perf_counter() - t0}


# ---------------------------------------------------------------- edges
def _column_max(pf: pq.ParquetFile, name: str) -> int | None:
    """Largest value of an integer column from the row-group statistics (None when absent)."""
    idx = pf.schema_arrow.get_field_index(name)
    if idx < 0:
        return None
    best = 0
    for g in range(pf.metadata.num_row_groups):
        stats = pf.metadata.row_group(g).column(idx).statistics
        if stats is None or not stats.has_min_max:
            if pf.metadata.row_group(g).num_rows:
                return None
            continue
        best = max(best, int(stats.max))
    return best


def _synapse_columns(path, pf: pq.ParquetFile, min_score):
    """Columns to read, whether sizes are present, and the largest id and size (from statistics)."""
    names = pf.schema_arrow.names
    for c in ("pre_id", "post_id"):
        if c not in names:
            raise StoreError(f"{path}: malformed synapse table, no column {c}")
    has_size = "size" in names and any(
        pf.metadata.row_group(g).column(names.index("size")).statistics is None
        or pf.metadata.row_group(g).column(names.index("size")).statistics.null_count < pf.metadata.row_group(g).num_rows
        for g in range(pf.metadata.num_row_groups))
    if min_score is not None and "score" not in names:
        raise InputError(f"{path}: a minimum score was asked for but the synapse table has no score column")
    columns = ["pre_id", "post_id"] + (["size"] if has_size else []) + (["score"] if min_score is not None else [])
    max_id = max(_column_max(pf, "pre_id") or -1, _column_max(pf, "post_id") or -1)
    max_size = _column_max(pf, "size") if has_size else 0
    if max_id < 0 or max_size is None:  # no statistics: one extra pass over the id/size columns
        t = pf.read(columns=columns)
        max_id = max(int(pc.max(t.column("pre_id")).as_py() or 0), int(pc.max(t.column("post_id")).as_py() or 0))
        max_size = int(pc.max(t.column("size")).as_py() or 0) if has_size else 0
    return columns, has_size, max_id, int(max_size or 0)


@contextlib.contextmanager
def _no_gc():
    """Python's cyclic GC paused: the ingest makes many short-lived objects and no cycles, and a full
    collection over a large heap (Numba, Arrow) would otherwise cost several percent of it."""
    was = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was:
            gc.enable()


def _read_row_groups(path, groups, columns, batch_rows, consume, stop) -> None:
    """Hand ``consume`` every record batch of some row groups of a Parquet file (one reader per thread)."""
    pf = pq.ParquetFile(path)  # not memory-mapped: as fast here, and the file's pages do not count as ours
    for g in groups:
        for batch in pf.iter_batches(batch_size=batch_rows, row_groups=[g], columns=columns, use_threads=False):
            if stop.is_set():
                return
            consume(batch)


def accumulate_synapse_file(path, *, ids=None, min_score: float | None = None, threads: int | None = None,
                            batch_rows: int = 1 << 20) -> tuple[EdgeAccumulator, dict]:
    """Stream a synapse Parquet file into an :class:`~connectome.graph.EdgeAccumulator`.

    Row groups are read, decoded and packed on ``threads`` threads at once
    (each with its own reader; decoding and packing release the GIL), so
    the columns are never held whole: 8 bytes a synapse, plus one batch
    of ``batch_rows`` rows per thread.

    Returns
    -------
    (EdgeAccumulator, dict)
        The accumulator, ready for :meth:`~connectome.graph.EdgeAccumulator.iter_result`,
        and counts: ``synapses`` (read), ``below_score``, ``has_size``.
    """
    pf = pq.ParquetFile(path)
    columns, has_size, max_id, max_size = _synapse_columns(path, pf, min_score)
    n = pf.metadata.num_rows
    if ids is None and 2 * max(1, max_id.bit_length()) + max(0, max_size.bit_length()) > 64:
        ids = unique_ids(_iter_id_columns(path, pf.metadata.num_row_groups))
    threads = max(1, threads or os.cpu_count() or 1)
    acc = EdgeAccumulator(n, max_id, max_size, ids=ids, threads=threads)
    below = [0] * threads
    stop = threading.Event()

    def consume(batch, j):
        pre = batch.column("pre_id")
        post = batch.column("post_id")
        if pre.null_count or post.null_count:
            raise StoreError(f"{path}: pre_id/post_id have empty values")
        size = None
        if has_size:
            col = batch.column("size")
            size = (col.fill_null(0) if col.null_count else col).to_numpy()
        keep = None
        if min_score is not None:
            col = batch.column("score")
            keep = pc.greater_equal(col, pa.scalar(min_score, col.type) if pa.types.is_floating(col.type)
                                    else pa.scalar(float(min_score)))
            keep = (keep.fill_null(False) if keep.null_count else keep).to_numpy(zero_copy_only=False)
            below[j] += int(keep.size - np.count_nonzero(keep))
        acc.add(pre.to_numpy(), post.to_numpy(), size, keep=keep, threads=1)

    groups = list(range(pf.metadata.num_row_groups))
    workers = max(1, min(threads, len(groups)))
    if workers == 1:
        _read_row_groups(path, groups, columns, batch_rows, lambda b: consume(b, 0), stop)
    else:
        with ThreadPoolExecutor(workers) as pool:
            jobs = [pool.submit(_read_row_groups, path, groups[j::workers], columns, batch_rows,
                                functools.partial(consume, j=j), stop) for j in range(workers)]
            try:
                for job in jobs:
                    job.result()
            finally:
                stop.set()
    return acc, {"synapses": n, "below_score": sum(below), "has_size": bool(has_size)}


def _iter_id_columns(path, n_groups: int):
    """pre_id and post_id of a synapse file, row group by row group (for :func:`unique_ids`)."""
    pf = pq.ParquetFile(path)
    for g in range(n_groups):
        t = pf.read_row_group(g, columns=["pre_id", "post_id"])
        for c in ("pre_id", "post_id"):
            col = t.column(c)
            if col.null_count:
                raise StoreError(f"{path}: pre_id/post_id have empty values")
            yield col.to_numpy()


def aggregate_synapse_file(path, *, ids=None, min_score: float | None = None, threads: int | None = None,
                           batch_rows: int = 1 << 20) -> tuple[dict, dict]:
    """Edges of a synapse Parquet file, streamed by row groups (8 bytes held per synapse).

    Returns the edges (see :func:`connectome.graph.aggregate_edges`) and
    counts: ``synapses`` (read), ``used``, ``unassigned``, ``below_score``, ``has_size``.
    """
    with _no_gc():
        acc, counts = accumulate_synapse_file(path, ids=ids, min_score=min_score, threads=threads,
                                              batch_rows=batch_rows)
        edges = acc.result()
    return edges, {"synapses": counts["synapses"], "used": acc.n - acc.unassigned, "unassigned": acc.unassigned,
                   "below_score": counts["below_score"], "has_size": counts["has_size"]}


#: How ``graph/edges.parquet`` is encoded: sorted ids and small counts delta-encode to a few bits a
#: value, which writes and reads several times faster than a general-purpose codec at about its size.
EDGE_ENCODING = {c: "DELTA_BINARY_PACKED" for c in st.EDGE_SCHEMA.names}


class _EdgeWriter:
    """Write sorted edge pieces to ``graph/edges.parquet`` as they come, atomically (rename at the end)."""

    def __init__(self, ds: Dataset, has_size: bool, keep: bool):
        self.path = ds.table_path(st.EDGES)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.tmp = self.path.with_name(self.path.name + f".tmp-{os.getpid()}-{threading.get_ident()}")
        self.has_size = has_size
        self.keep = keep  # also keep the pieces in memory (for the neuron counts, when the kernel did not)
        self.kept: list = []
        self.pending: list = []
        self.rows = 0
        self.edges = 0
        schema = st.EDGE_SCHEMA
        self.writer = pq.ParquetWriter(self.tmp, schema, compression="none", use_dictionary=False,
                                       column_encoding=EDGE_ENCODING,
                                       sorting_columns=[pq.SortingColumn(0), pq.SortingColumn(1)])

    def add(self, chunk: dict) -> None:
        self.pending.append(chunk)
        self.rows += len(chunk["pre_id"])
        self.edges += len(chunk["pre_id"])
        if self.keep:
            self.kept.append(chunk)
        if self.rows >= st.ROW_GROUP:
            self._flush()

    def _flush(self) -> None:
        if not self.pending:
            return
        cols = {k: np.concatenate([c[k] for c in self.pending]) if len(self.pending) > 1 else self.pending[0][k]
                for k in EDGE_COLUMNS}
        self.pending, self.rows = [], 0
        self.writer.write_table(st.edges_table(cols, has_size=self.has_size), row_group_size=1 << 30)

    def commit(self) -> None:
        self._flush()
        self.writer.close()
        os.replace(self.tmp, self.path)

    def abort(self) -> None:
        try:
            self.writer.close()
        finally:
            if self.tmp.exists():
                self.tmp.unlink()

    def all_edges(self) -> dict:
        if not self.kept:
            return {k: np.zeros(0, np.uint64 if k.endswith("_id") else np.int64) for k in EDGE_COLUMNS}
        return {k: np.concatenate([c[k] for c in self.kept]) for k in EDGE_COLUMNS}


def build_edges(ds: Dataset, *, min_score: float | None = None, threads: int | None = None,
                overwrite: bool = False) -> dict:
    """Write ``graph/edges.parquet`` from ``em/synapses.parquet`` and the neurons' synapse counts.

    One pass over the synapse file, streamed: row groups are decoded and
    packed on all threads at once (:func:`accumulate_synapse_file`), then
    the radix buckets are sorted on the thread pool while this thread
    writes the finished ones, in order, to ``graph/edges.parquet``
    (delta-encoded, :data:`EDGE_ENCODING`); the neurons' synapse and
    partner counts come out of the same reduction.

    Parameters
    ----------
    min_score : float, optional
        Leave out synapses scored below this (e.g. FlyWire's cleft score 50).
    threads : int, optional
        Reading, packing and sorting threads (default: the CPU count).

    Returns
    -------
    dict
        ``edges, synapses, used, unassigned, below_score, seconds``.
    """
    t0 = time.perf_counter()
    stage = "graph.edges"
    path = ds.table_path(st.SYNAPSES)
    if not path.is_file():
        raise StageError(f"{ds.path}: no em/synapses.parquet; import synapse detections first (--synapses TABLE)")
    s = path.stat()
    params = {"synapses_bytes": s.st_size, "synapses_mtime_ns": s.st_mtime_ns, "min_score": min_score}
    prev = ds.provenance.get(stage)
    if (not overwrite and prev and prev.get("status") == "done" and prev.get("parameters") == params
            and ds.has_table(st.EDGES)):
        return {k: prev.get(k) for k in ("edges", "synapses", "used", "unassigned", "below_score")} | {"seconds": 0.0}
    ds.provenance.begin(stage, parameters=params)
    neurons = st.read_store_table(ds, st.NEURONS, st.NEURON_REQUIRED, optional=True)
    ids = st.id_column(neurons, "neuron_id", "graph/neurons.parquet") if neurons is not None else None
    with _no_gc():
        acc, counts = accumulate_synapse_file(path, ids=ids, min_score=min_score, threads=threads)
        writer = _EdgeWriter(ds, counts["has_size"], keep=not acc.keeps_degrees)
        try:
            for chunk in acc.iter_result():
                writer.add(chunk)
            writer._flush()
        except BaseException:
            writer.abort()
            raise
    try:
        if neurons is None:
            if writer.keep:
                e = writer.all_edges()
                both = np.unique(np.concatenate([e["pre_id"], e["post_id"]]))
            else:
                both = acc.edge_neurons()
            neurons = pa.table({"neuron_id": pa.array(both.astype(np.uint64))})
        try:
            degrees = acc.degrees_for(neurons.column("neuron_id").to_numpy())
            if degrees is None:
                e = writer.all_edges()
                neurons = with_degrees(neurons, e["pre_id"], e["post_id"], e["n_synapses"])
            else:
                neurons = set_degrees(neurons, degrees)
        except (InputError, StoreError) as e:
            raise StoreError(f"{ds.path}: em/synapses.parquet and graph/neurons.parquet disagree ({e}); "
                             "re-run the graph stage with --overwrite graph") from None
        writer.commit()
    except BaseException:
        writer.abort()
        raise
    st.write_table(ds, st.NEURONS, neurons, sorting=["neuron_id"])
    report = {"edges": int(writer.edges), "synapses": counts["synapses"], "used": acc.n - acc.unassigned,
              "unassigned": acc.unassigned, "below_score": counts["below_score"]}
    ds.provenance.end(stage, **report, seconds=round(time.perf_counter() - t0, 3))
    return report | {"seconds": time.perf_counter() - t0}


def run_graph(ds: Dataset, *, synapses=None, segmentation: str = SEGMENTATION, coordinates: str = "voxel",
              min_score: float | None = None, block_shape=None, executor: Executor | None = None,
              device: str = "cpu", overwrite: bool = False, show_progress: bool | None = None) -> dict:
    """The whole ``graph`` stage of an EM store: neurons, (synapse import), edges.

    Steps whose input is missing are skipped: no segmentation → no neuron
    statistics (and synapse tables must carry their ids); no synapse table
    in the store and none given → no edges.
    """
    t0 = time.perf_counter()
    out: dict = {}
    if segmentation in ds:
        out["neurons"] = neuron_statistics(ds, segmentation=segmentation, block_shape=block_shape, executor=executor,
                                           device=device, overwrite=overwrite, show_progress=show_progress).num_rows
    if synapses is not None:
        out["synapses"] = import_synapses(ds, synapses, segmentation=segmentation, coordinates=coordinates,
                                          executor=executor, overwrite=overwrite, show_progress=show_progress)
    if ds.has_table(st.SYNAPSES):
        out["edges"] = build_edges(ds, min_score=min_score, overwrite=overwrite)
    out["seconds"] = time.perf_counter() - t0
    return out
