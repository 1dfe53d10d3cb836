"""Import public connectomes: edge lists and neuPrint-style exports.

Edge lists (CSV, TSV or Parquet) have one row per connection: a pre column,
a post column, optionally a weight (synapse count; without one every row
counts as one synapse) and a type (chemical vs electrical). Cells are given
by integer ids or by names; names are stripped of surrounding spaces and
numbered ``1 … n`` in sorted order, and kept in the neuron table's ``name``
column so queries accept them. Repeated (pre, post, type) rows are summed.

neuPrint-style exports add a neuron table (``bodyId`` plus attributes such
as ``type``, ``instance``, ``size``); its attributes are kept, ``instance``
doubles as ``name`` and ``size`` as ``n_voxels``. Neo4j column suffixes
(``bodyId:long``, ``:START_ID(Body-ID)``) are understood.

Chemical connections go to ``graph/edges.parquet``; electrical ones (gap
junctions) to ``graph/electrical_edges.parquet``, as listed.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa

from connectome.errors import InputError, StoreError
from connectome.graph import _store as st
from connectome.graph._points import read_table

PRE = ("pre", "pre_id", "pre_name", "source", "from", "presynaptic", "bodyid_pre", "pre_root_id",
       "pre_pt_root_id", "start_id", "pre_body_id", "pre_neuron")
POST = ("post", "post_id", "post_name", "target", "to", "postsynaptic", "bodyid_post", "post_root_id",
        "post_pt_root_id", "end_id", "post_body_id", "post_neuron")
WEIGHT = ("weight", "n_synapses", "synapses", "syn_count", "count", "nsyn", "weight_em_sections")
TYPE = ("type", "edge_type", "synapse_type", "kind")
NEURON_ID = ("bodyid", "neuron_id", "id", "body_id", "root_id", "pt_root_id")
CHEMICAL = ("chemical", "chem", "synapse", "synaptic", "send")
ELECTRICAL = ("electrical", "electric", "gap junction", "gap_junction", "gapjunction", "gj", "ej")


@dataclass
class ImportReport:
    """What an import wrote."""

    path: Path
    neurons: int
    edges: int
    synapses: int
    electrical_edges: int = 0
    electrical_weight: int = 0
    merged_rows: int = 0
    added_neurons: int = 0
    named: bool = False


def _norm(col: str) -> str:
    c = col.strip().lower()
    c = re.sub(r"\(.*\)$", "", c)
    c = c.lstrip(":")
    return c.split(":")[0].strip()


def _find(table: pa.Table, given: str | None, candidates, what: str, where: str, required: bool = True) -> str | None:
    names = table.column_names
    if given is not None:
        if given in names:
            return given
        by_norm = {_norm(c): c for c in names}
        if _norm(given) in by_norm:
            return by_norm[_norm(given)]
        raise InputError(f"{where}: no column {given!r} for {what}; columns are {', '.join(names)}")
    by_norm = {}
    for c in names:
        by_norm.setdefault(_norm(c), c)
    for cand in candidates:
        if cand in by_norm:
            return by_norm[cand]
    if required:
        raise InputError(f"{where}: cannot tell which column is {what} (pass --{what.split()[0]} COL); "
                         f"columns are {', '.join(names)}")
    return None


def _cells(table: pa.Table, col: str, where: str):
    """A pre/post column as ('id', uint64 array) or ('name', object array of stripped names)."""
    arr = table.column(col)
    if arr.null_count:
        raise InputError(f"{where}: column {col!r} has {arr.null_count} empty cells")
    if pa.types.is_integer(arr.type):
        v = arr.to_numpy()
        if v.size and v.min() <= 0:
            raise InputError(f"{where}: column {col!r} has id {int(v.min())}; neuron ids start at 1 (0 is background)")
        return "id", v.astype(np.uint64)
    if pa.types.is_string(arr.type) or pa.types.is_large_string(arr.type):
        names = np.asarray([s.strip() for s in arr.to_pylist()], dtype=object)
        if any(n == "" for n in names):
            raise InputError(f"{where}: column {col!r} has blank cell names")
        return "name", names
    raise InputError(f"{where}: column {col!r} must hold cell names or integer ids, found {arr.type}")


def _weights(table: pa.Table, col: str | None, n: int, where: str) -> np.ndarray:
    if col is None:
        return np.ones(n, np.int64)
    arr = table.column(col)
    if not (pa.types.is_integer(arr.type) or pa.types.is_floating(arr.type)):
        raise InputError(f"{where}: weight column {col!r} must be numeric, found {arr.type}")
    if arr.null_count:
        raise InputError(f"{where}: weight column {col!r} has {arr.null_count} empty cells")
    w = arr.to_numpy().astype(np.float64)
    if np.any(~np.isfinite(w)) or np.any(w < 0) or np.any(w != np.floor(w)):
        k = int(np.argmax(~np.isfinite(w) | (w < 0) | (w != np.floor(w))))
        raise InputError(f"{where}: weight column {col!r} must hold whole synapse counts ≥ 0, found {w[k]} (row {k + 1})")
    return w.astype(np.int64)


def _kinds(table: pa.Table, col: str | None, n: int, where: str) -> np.ndarray:
    """True where a row is electrical."""
    if col is None:
        return np.zeros(n, bool)
    values = [("" if v is None else str(v)).strip().lower() for v in table.column(col).to_pylist()]
    uniq = set(values)
    unknown = sorted(u for u in uniq if u not in CHEMICAL and u not in ELECTRICAL)
    if unknown:
        raise InputError(f"{where}: unknown connection type {unknown[0]!r} in column {col!r}; "
                         "expected chemical or electrical (gap junction)")
    return np.array([v in ELECTRICAL for v in values], bool)


def _sum_rows(pre: np.ndarray, post: np.ndarray, w: np.ndarray):
    """Sum the weights of repeated (pre, post) rows; sorted by (pre, post)."""
    if pre.size == 0:
        return pre, post, w, 0
    order = np.lexsort((post, pre))
    pre, post, w = pre[order], post[order], w[order]
    first = np.ones(pre.size, bool)
    first[1:] = (pre[1:] != pre[:-1]) | (post[1:] != post[:-1])
    starts = np.flatnonzero(first)
    return pre[starts], post[starts], np.add.reduceat(w, starts), int(pre.size - starts.size)


def _open_destination(dest, overwrite: bool):
    from connectome.io import Dataset

    dest = Path(dest)
    if dest.exists():
        ds = Dataset(dest)
        if ds.has_table(st.EDGES) and not overwrite:
            raise StoreError(f"{dest} already holds graph/edges.parquet (pass --overwrite to replace the graph)")
        return ds
    return None


def _neuron_table_from_names(names: np.ndarray) -> pa.Table:
    n = names.size
    return pa.table({
        "neuron_id": pa.array(np.arange(1, n + 1, dtype=np.uint64)), "name": pa.array(names.tolist(), pa.string()),
        "n_voxels": pa.nulls(n, pa.int64()), "z": pa.nulls(n, pa.float64()), "y": pa.nulls(n, pa.float64()),
        "x": pa.nulls(n, pa.float64()),
    })


def read_neuron_table(source, where: str | None = None) -> pa.Table:
    """A neuPrint-style neuron table: ``neuron_id`` first, attributes kept, sorted by id."""
    where = where or f"neuron table {source}"
    t = read_table(source, where)
    col = _find(t, None, NEURON_ID, "neuron id column", where)
    kind, ids = _cells(t, col, where)
    if kind != "id":
        raise InputError(f"{where}: column {col!r} must hold integer neuron ids")
    if np.unique(ids).size != ids.size:
        raise InputError(f"{where}: column {col!r} repeats neuron ids")
    cols = {"neuron_id": pa.array(ids)}
    for c in t.column_names:
        if c == col:
            continue
        name = _norm(c) if _norm(c) else c
        if name in cols or name == "neuron_id":
            continue
        cols[name] = t.column(c)
    if "name" not in cols and "instance" in cols:
        cols["name"] = cols["instance"]
    if "n_voxels" not in cols and "size" in cols:
        cols["n_voxels"] = cols["size"]
    out = pa.table(cols)
    return out.take(pa.array(np.argsort(ids, kind="stable")))


def import_edge_list(source, dest, *, pre: str | None = None, post: str | None = None, weight: str | None = None,
                     type: str | None = None, neurons=None, overwrite: bool = False) -> ImportReport:
    """Import an edge list (and optionally a neuPrint-style neuron table) into a store.

    Parameters
    ----------
    source : path or pyarrow.Table
        CSV / TSV / Parquet with one row per connection.
    dest : path
        The store to write (created when absent; an existing store gets a
        graph unless it has one already and ``overwrite`` is False).
    pre, post, weight, type : str, optional
        Column names; by default recognised from common names (``pre``,
        ``source``, ``bodyId_pre`` …; ``weight``, ``n_synapses`` …; ``type``).
    neurons : path or pyarrow.Table, optional
        neuPrint-style neuron table (``bodyId`` and attributes).
    overwrite : bool
        Replace an existing graph in ``dest``.

    Returns
    -------
    ImportReport

    Raises
    ------
    InputError
        Missing or unreadable file, unknown column, empty or malformed
        cells, non-integer or negative weights, unknown connection types.

    Examples
    --------
    >>> import_edge_list("herm_full_edgelist.csv", "celegans.zarr")   # doctest: +SKIP
    ImportReport(path=..., neurons=448, edges=4681, synapses=27019, electrical_edges=2698, ...)
    """
    where = f"edge list {source}" if isinstance(source, (str, Path)) else "edge list"
    table = read_table(source, where)
    if table.num_rows == 0:
        raise InputError(f"{where} has no rows")
    pre_col = _find(table, pre, PRE, "pre column", where)
    post_col = _find(table, post, POST, "post column", where)
    if pre_col == post_col:
        raise InputError(f"{where}: the pre and post columns are both {pre_col!r}")
    weight_col = _find(table, weight, WEIGHT, "weight column", where, required=weight is not None)
    type_col = _find(table, type, TYPE, "type column", where, required=type is not None)
    kind_pre, a = _cells(table, pre_col, where)
    kind_post, b = _cells(table, post_col, where)
    w = _weights(table, weight_col, table.num_rows, where)
    electrical = _kinds(table, type_col, table.num_rows, where)

    neuron_table = read_neuron_table(neurons) if neurons is not None else None
    named = False
    if kind_pre == "name" or kind_post == "name":
        if neuron_table is not None:
            raise InputError(f"{where}: cells are given by name but a neuron table with ids was given too")
        a = a.astype(str).astype(object) if kind_pre == "id" else a
        b = b.astype(str).astype(object) if kind_post == "id" else b
        names = np.unique(np.concatenate([a, b]).astype(str))
        pos = {n: i + 1 for i, n in enumerate(names.tolist())}
        a = np.fromiter((pos[str(v)] for v in a), np.uint64, a.size)
        b = np.fromiter((pos[str(v)] for v in b), np.uint64, b.size)
        neuron_table = _neuron_table_from_names(names.astype(object))
        named = True
    added = 0
    if neuron_table is None:
        ids = np.unique(np.concatenate([a, b]))
        neuron_table = pa.table({"neuron_id": pa.array(ids)})
    else:
        known = neuron_table.column("neuron_id").to_numpy().astype(np.uint64)
        extra = np.setdiff1d(np.unique(np.concatenate([a, b])), known)
        if extra.size:  # connections of bodies the neuron table does not list: keep them, attributes empty
            added = int(extra.size)
            filler = pa.table({"neuron_id": pa.array(extra)})
            neuron_table = pa.concat_tables([neuron_table, filler], promote_options="default")
            neuron_table = neuron_table.take(pa.array(np.argsort(neuron_table.column("neuron_id").to_numpy(), kind="stable")))

    chem = ~electrical
    cp, cq, cw, merged = _sum_rows(a[chem], b[chem], w[chem])
    ep, eq, ew, merged_e = _sum_rows(a[electrical], b[electrical], w[electrical])
    edges = st.edges_table({"pre_id": cp, "post_id": cq, "n_synapses": cw, "total_size": np.zeros(cp.size)}, has_size=False)
    neuron_table = with_degrees(neuron_table, cp, cq, cw)

    from connectome.io import Dataset

    ds = _open_destination(dest, overwrite)
    if ds is None:
        ds = Dataset.create(dest)
    params = {"source": str(source) if isinstance(source, (str, Path)) else "table", "pre": pre_col, "post": post_col,
              "weight": weight_col, "type": type_col, "neurons": str(neurons) if neurons is not None else None}
    ds.provenance.begin("graph.import", parameters=params)
    for name in (st.EDGES, st.ELECTRICAL, st.COREGISTRATION):
        if ds.table_path(name).exists():
            ds.table_path(name).unlink()
    st.write_table(ds, st.NEURONS, neuron_table, sorting=["neuron_id"])
    if ep.size:
        st.write_table(ds, st.ELECTRICAL, st.edges_table(
            {"pre_id": ep, "post_id": eq, "n_synapses": ew, "total_size": np.zeros(ep.size)}, has_size=False),
            sorting=["pre_id", "post_id"])
    st.write_table(ds, st.EDGES, edges, sorting=["pre_id", "post_id"])
    report = ImportReport(ds.path, neuron_table.num_rows, int(cp.size), int(cw.sum()), int(ep.size), int(ew.sum()),
                          merged + merged_e, added, named)
    ds.provenance.end("graph.import", neurons=report.neurons, edges=report.edges, synapses=report.synapses,
                      electrical_edges=report.electrical_edges)
    return report


def with_degrees(neurons: pa.Table, pre: np.ndarray, post: np.ndarray, n_synapses: np.ndarray) -> pa.Table:
    """Add ``n_outputs, n_inputs`` (synapses) and ``n_downstream, n_upstream`` (partners) to a neuron table.

    Raises
    ------
    StoreError
        An edge names a neuron that the table does not list.
    """
    ids = neurons.column("neuron_id").to_numpy().astype(np.uint64)
    from connectome.graph._ids import IdIndex

    index = IdIndex(ids)
    pi, qi = index.lookup(np.asarray(pre, np.uint64)), index.lookup(np.asarray(post, np.uint64))
    if np.any(pi < 0) or np.any(qi < 0):
        k = int(np.argmax((pi < 0) | (qi < 0)))
        missing = int(pre[k]) if pi[k] < 0 else int(post[k])
        raise StoreError(f"edges name neuron {missing}, which the neuron table does not list")
    n = ids.size
    w = np.asarray(n_synapses, np.int64)
    return set_degrees(neurons, {
        "n_outputs": np.bincount(pi, weights=w, minlength=n).astype(np.int64),  # exact below 2**53 synapses
        "n_inputs": np.bincount(qi, weights=w, minlength=n).astype(np.int64),
        "n_downstream": np.bincount(pi, minlength=n).astype(np.int64),
        "n_upstream": np.bincount(qi, minlength=n).astype(np.int64),
    })


def set_degrees(neurons: pa.Table, degrees: dict) -> pa.Table:
    """Put the columns ``n_outputs, n_inputs, n_downstream, n_upstream`` (arrays in table order) in a neuron table."""
    for name in ("n_outputs", "n_inputs", "n_downstream", "n_upstream"):
        values = np.asarray(degrees[name], np.int64)
        if values.shape != (neurons.num_rows,):
            raise InputError(f"{name} must have one value per neuron ({neurons.num_rows}), got shape {values.shape}")
        if name in neurons.column_names:
            neurons = neurons.drop_columns([name])
        neurons = neurons.append_column(name, pa.array(values))
    return neurons
