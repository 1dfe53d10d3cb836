"""A neuron's synaptic (and functional) partners, with colours for display."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import pyarrow as pa

from connectome.errors import InputError, StoreError

SELECTED = (1.0, 0.9, 0.0, 1.0)
BOTH = (0.85, 0.2, 0.85, 1.0)
_UP = ((0.65, 0.85, 1.0), (0.0, 0.25, 1.0))  # few → many synapses onto the neuron
_DOWN = ((1.0, 0.8, 0.55), (0.85, 0.05, 0.0))  # few → many synapses from the neuron


def _ramp(pair, w: float) -> tuple:
    lo, hi = pair
    return tuple(float(a + (b - a) * w) for a, b in zip(lo, hi)) + (1.0,)


@dataclass
class PartnerView:
    """Partners of one neuron.

    Attributes
    ----------
    neuron_id : int
    min_synapses : int
    upstream, downstream : dict of str to (k,) arrays
        ``neuron_id`` (uint64) and ``n_synapses`` (int64), strongest first.
    functional : pyarrow.Table or None
        ``roi_id`` (the neuron's ROI), ``partner_roi``, ``neuron_id`` (the
        partner's neuron, 0 where not co-registered), ``correlation``, strongest
        first; None without co-registration or functional edges.
    centroids : dict of int to (z, y, x)
        Level-0 voxel centroid of the neuron and its partners, where known.
    """

    neuron_id: int
    min_synapses: int
    upstream: dict
    downstream: dict
    functional: pa.Table | None = None
    centroids: dict = field(default_factory=dict)

    @property
    def partner_ids(self) -> np.ndarray:
        return np.union1d(self.upstream["neuron_id"], self.downstream["neuron_id"]).astype(np.uint64)

    def colors(self) -> dict[int, tuple]:
        """RGBA per neuron id: the neuron yellow, inputs blue, outputs red, both ways magenta.

        Colour depth grows with the synapse count relative to the strongest partner.
        """
        out = {}
        for d, ramp in ((self.upstream, _UP), (self.downstream, _DOWN)):
            n = d["n_synapses"].astype(np.float64)
            top = n.max() if n.size else 1.0
            for i, k in zip(d["neuron_id"].tolist(), n.tolist()):
                w = (k - 1) / (top - 1) if top > 1 else 1.0
                out[int(i)] = BOTH if int(i) in out else _ramp(ramp, w)
        out[int(self.neuron_id)] = SELECTED
        return out

    def rows(self) -> list[dict]:
        """One row per partner for a table: ``direction, neuron_id, n_synapses, z, y, x``."""
        rows = []
        for direction, d in (("up", self.upstream), ("down", self.downstream)):
            for i, n in zip(d["neuron_id"].tolist(), d["n_synapses"].tolist()):
                c = self.centroids.get(int(i), (np.nan,) * 3)
                rows.append({"direction": direction, "neuron_id": int(i), "n_synapses": int(n),
                             "z": float(c[0]), "y": float(c[1]), "x": float(c[2])})
        if self.functional is not None:
            for r in self.functional.to_pylist():
                c = self.centroids.get(int(r["neuron_id"] or 0), (np.nan,) * 3)
                rows.append({"direction": "functional", "neuron_id": int(r["neuron_id"] or 0),
                             "roi_id": int(r["partner_roi"]), "correlation": float(r["correlation"]),
                             "n_synapses": 0, "z": float(c[0]), "y": float(c[1]), "x": float(c[2])})
        return rows


def _functional(graph, neuron_id: int) -> pa.Table | None:
    try:
        co = graph.coregistration()
        fe = graph.functional_edges()
    except StoreError:
        return None
    roi = co.column("roi_id").to_numpy().astype(np.int64)
    nid = co.column("neuron_id").to_numpy().astype(np.uint64)
    mine = roi[nid == neuron_id]
    if mine.size == 0:
        return None
    r = int(mine[0])
    a = fe.column("roi_a").to_numpy().astype(np.int64)
    b = fe.column("roi_b").to_numpy().astype(np.int64)
    corr = fe.column("correlation").to_numpy(zero_copy_only=False).astype(np.float64)
    hit = (a == r) | (b == r)
    other = np.where(a[hit] == r, b[hit], a[hit])
    c = corr[hit]
    to_neuron = dict(zip(roi.tolist(), nid.tolist()))
    partner_neuron = np.array([to_neuron.get(int(o), 0) for o in other], np.uint64)
    order = np.argsort(-np.abs(np.nan_to_num(c)), kind="stable")
    return pa.table({"roi_id": pa.array(np.full(order.size, r, np.int64)), "partner_roi": pa.array(other[order]),
                     "neuron_id": pa.array(partner_neuron[order]), "correlation": pa.array(c[order])})


def partners(dataset, neuron_id, *, min_synapses: int = 1, graph=None) -> PartnerView:
    """Upstream and downstream partners of a neuron (and functional partners of its ROI).

    Parameters
    ----------
    dataset : str, Path or Dataset
        A store with ``graph/edges.parquet`` (and ``graph/neurons.parquet``).
    neuron_id : int
    min_synapses : int
        Keep partners connected by at least this many synapses.
    graph : connectome.graph.Graph, optional
        An already loaded graph of the store (saves reloading it).

    Returns
    -------
    PartnerView
    """
    from connectome.graph import open_graph

    try:
        neuron_id = int(neuron_id)
    except (TypeError, ValueError):
        raise InputError(f"neuron id must be an integer, got {neuron_id!r}") from None
    if int(min_synapses) < 1:
        raise InputError(f"min_synapses must be at least 1, got {min_synapses}")
    g = graph if graph is not None else open_graph(dataset)
    out = {}
    for d in ("up", "down"):
        t = g.partners(neuron_id, direction=d, min_synapses=int(min_synapses))
        out[d] = {"neuron_id": t.column("neuron_id").to_numpy().astype(np.uint64),
                  "n_synapses": t.column("n_synapses").to_numpy().astype(np.int64)}
    view = PartnerView(neuron_id, int(min_synapses), out["up"], out["down"], _functional(g, neuron_id))
    cols = g.neurons.column_names
    if all(c in cols for c in "zyx"):
        ids = g.neurons.column("neuron_id").to_numpy().astype(np.uint64)
        want = np.union1d(view.partner_ids, [neuron_id]).astype(np.uint64)
        if view.functional is not None:
            want = np.union1d(want, view.functional.column("neuron_id").to_numpy().astype(np.uint64))
        rows = np.flatnonzero(np.isin(ids, want))
        zyx = np.stack([g.neurons.column(c).to_numpy(zero_copy_only=False).astype(np.float64) for c in "zyx"], 1)
        view.centroids = {int(ids[r]): tuple(float(v) for v in zyx[r]) for r in rows}
    return view
