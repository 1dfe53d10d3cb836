"""Review: the logic behind the napari plugin, usable from scripts (no Qt).

* :func:`store_layers` — what to show of a store (paths, scales, hints).
* :class:`Curation` — accept / reject ROIs, written to ``twophoton/rois.parquet``.
* :class:`Proofreader` — merge, split (seeded watershed), undo / redo, with a
  durable edit log (``em/edits.jsonl``) replayed after a crash; keeps the
  graph tables up to date.
* :func:`partners` — a neuron's upstream / downstream (and functional)
  partners with display colours.
"""

from connectome.review._curation import Curation, Traces
from connectome.review._layers import LayerSpec, is_store, store_layers
from connectome.review._partners import PartnerView, partners
from connectome.review._proofread import Edit, Proofreader
from connectome.review._tables import segment_statistics, update_graph_tables

__all__ = [
    "Curation",
    "Edit",
    "LayerSpec",
    "PartnerView",
    "Proofreader",
    "Traces",
    "is_store",
    "partners",
    "segment_statistics",
    "store_layers",
    "update_graph_tables",
]
