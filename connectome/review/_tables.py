"""Bring the graph tables up to date after an edit of the segmentation.

Only what an edit can change is recomputed: the rows of
``graph/neurons.parquet`` of the touched segments (from their voxels, read
chunk by chunk inside the union of their boxes), the ``pre_id`` / ``post_id``
of the synapses whose points lie inside the edited box, and then the edges
(``connectome.graph.aggregate_edges`` over the synapse table) and the
neurons' synapse counts.
"""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from connectome.graph import _store as st
from connectome.graph import aggregate_edges, block_statistics, merge_statistics, neuron_table, with_degrees
from connectome.graph._points import voxel_points

_DEGREES = ("n_outputs", "n_inputs", "n_downstream", "n_upstream")


def _chunks(lo, hi, chunks, shape):
    import itertools

    for idx in itertools.product(*(range(l // c, (h - 1) // c + 1) for l, h, c in zip(lo, hi, chunks))):
        yield tuple(slice(i * c, min((i + 1) * c, s)) for i, c, s in zip(idx, chunks, shape))


def segment_statistics(array, ids, box) -> dict:
    """Exact size, centroid and box of segments ``ids`` whose voxels all lie in ``box``.

    Reads ``array`` chunk by chunk over ``box = (lo, hi)``; returns the
    :func:`connectome.graph.neuron_table` columns for the ids found.
    """
    ids = np.asarray(sorted(ids), dtype=array.dtype)
    lo, hi = box
    parts = []
    for region in _chunks(lo, hi, array.chunks, array.shape):
        block = array[region]
        keep = np.isin(block, ids)
        if keep.any():
            parts.append(block_statistics(np.where(keep, block, 0), tuple(r.start for r in region)))
    return neuron_table(merge_statistics(parts))


def _neuron_rows(old: pa.Table, stats: dict, touched: np.ndarray) -> pa.Table:
    old_ids = old.column("neuron_id").to_numpy().astype(np.uint64)
    kept = old.filter(pa.array(~np.isin(old_ids, touched)))
    new_ids = np.asarray(stats["neuron_id"], np.uint64)
    order = np.argsort(old_ids, kind="stable")
    if old_ids.size:
        pos = np.clip(np.searchsorted(old_ids[order], new_ids), 0, old_ids.size - 1)
        src = np.where(old_ids[order][pos] == new_ids, order[pos], -1)
    else:
        src = np.full(new_ids.size, -1)
    cols = {}
    for name in old.column_names:
        typ = old.schema.field(name).type
        if name in stats:
            cols[name] = pa.array(np.asarray(stats[name])).cast(typ)
        else:  # names, roi ids …: carried over for segments that existed, empty for new ones
            index = pa.array(np.where(src >= 0, src, 0), pa.int64(), mask=src < 0)
            cols[name] = old.column(name).take(index) if old.num_rows else pa.nulls(len(new_ids), typ)
    new = pa.table(cols, schema=old.schema)
    table = pa.concat_tables([kept, new])
    return table.take(pc.sort_indices(table, [("neuron_id", "ascending")]))


def update_graph_tables(ds, array, touched, box) -> dict:
    """Update neurons, synapse partners and edges for segments ``touched`` after an edit in ``box``.

    Parameters
    ----------
    ds : Dataset
    array : zarr.Array
        Level 0 of the (already edited) segmentation.
    touched : sequence of int
        Every id whose voxels the edit changed (kept, absorbed, split, new).
    box : (lo, hi)
        Half-open level-0 box of the changed voxels.

    Returns
    -------
    dict
        What was updated: ``neurons`` (rows rewritten), ``synapses`` (points
        looked up again), ``edges`` (edge count), each absent when its
        table does not exist.
    """
    touched = np.asarray(sorted(int(i) for i in touched if int(i) > 0), np.uint64)
    lo, hi = (tuple(int(v) for v in box[0]), tuple(int(v) for v in box[1]))
    report: dict = {}
    neurons = st.read_store_table(ds, st.NEURONS, st.NEURON_REQUIRED, optional=True)
    if neurons is not None and touched.size:
        if "z_min" in neurons.column_names:
            ids = neurons.column("neuron_id").to_numpy().astype(np.uint64)
            rows = np.flatnonzero(np.isin(ids, touched))
            for r in rows:  # the union of the touched segments' former boxes and the edited box
                lo = tuple(min(a, int(neurons.column(f"{ax}_min")[int(r)].as_py())) for a, ax in zip(lo, "zyx"))
                hi = tuple(max(b, int(neurons.column(f"{ax}_max")[int(r)].as_py()) + 1) for b, ax in zip(hi, "zyx"))
        else:
            lo, hi = (0, 0, 0), tuple(array.shape)
        stats = segment_statistics(array, touched, (lo, hi))
        neurons = _neuron_rows(neurons, stats, touched)
        report["neurons"] = int(len(stats["neuron_id"]))
    synapses = st.read_store_table(ds, st.SYNAPSES, ("pre_id", "post_id"), optional=True)
    if synapses is not None:
        blo, bhi = np.asarray(box[0]), np.asarray(box[1])
        cols = {}
        n_looked = 0
        for side in ("pre", "post"):
            values = synapses.column(f"{side}_id").to_numpy().astype(np.uint64).copy()
            names = [f"{side}_{a}" for a in "zyx"]
            if all(n in synapses.column_names for n in names):
                pts = voxel_points(np.stack([synapses.column(n).to_numpy() for n in names], axis=1))
                inside = np.all((pts >= blo) & (pts < bhi), axis=1)
                if inside.any():
                    sel = pts[inside]
                    values[inside] = np.asarray(array.get_coordinate_selection(tuple(sel.T)), np.uint64)
                    n_looked += int(inside.sum())
            cols[f"{side}_id"] = values
        for side in ("pre", "post"):
            i = synapses.schema.get_field_index(f"{side}_id")
            synapses = synapses.set_column(i, f"{side}_id", pa.array(cols[f"{side}_id"]))
        st.write_table(ds, st.SYNAPSES, synapses, row_group_size=1 << 20)
        report["synapses"] = n_looked
        size = synapses.column("size").to_numpy(zero_copy_only=False) if "size" in synapses.column_names else None
        if size is not None and synapses.column("size").null_count:
            size = None
        ids = None
        if neurons is not None:
            ids = np.unique(np.concatenate([neurons.column("neuron_id").to_numpy().astype(np.uint64),
                                            cols["pre_id"], cols["post_id"]]))
            ids = ids[ids > 0]
        edges = aggregate_edges(cols["pre_id"], cols["post_id"],
                                None if size is None else np.asarray(size, np.int64), ids=ids)
        st.write_table(ds, st.EDGES, st.edges_table(edges, has_size=size is not None),
                       sorting=["pre_id", "post_id"], dictionary=False)
        report["edges"] = int(len(edges["pre_id"]))
        if neurons is not None:
            missing = np.setdiff1d(np.concatenate([edges["pre_id"], edges["post_id"]]),
                                   neurons.column("neuron_id").to_numpy().astype(np.uint64))
            if missing.size:  # synapses on segments the table does not list (e.g. never measured)
                extra = pa.table({"neuron_id": pa.array(missing)}).cast(pa.schema([neurons.schema.field("neuron_id")]))
                neurons = pa.concat_tables([neurons, extra], promote_options="default")
                neurons = neurons.take(pc.sort_indices(neurons, [("neuron_id", "ascending")]))
            neurons = with_degrees(neurons, edges["pre_id"], edges["post_id"], edges["n_synapses"])
    if neurons is not None:
        st.write_table(ds, st.NEURONS, neurons, sorting=["neuron_id"])
    return report
