"""Structural half: EM boundary maps, supervoxels, region graph and agglomeration.

In-memory kernels on NumPy or CuPy (no scheduling here; ``workflows.em``
runs them blockwise over a dataset store):

* boundaries — :func:`filter_bank` (classical, no training),
  :func:`features` + :class:`PixelClassifier` (random forest, trained by
  :func:`train`, saved as plain arrays, :func:`load_model`);
* supervoxels — :func:`watershed_fragments`;
* region graph — :func:`block_rag`, :func:`merge_rags`;
* agglomeration — :func:`agglomerate`, :func:`threshold_lookup`,
  :func:`mutex_watershed`, :func:`cleanup`;
* synapses — :func:`detect_synapses` (cleft probability from a trained
  :class:`SynapseModel`, candidates, pre/post sides and points, object scores),
  :func:`train_synapse_model`, :func:`load_synapse_model`;
* :func:`segment` — all of it on one in-memory volume.
"""

from connectome.em._agglomerate import MergeTree, agglomerate, cleanup, mutex_watershed, threshold_lookup
from connectome.em._boundaries import (
    FeatureSpec,
    choose_mode,
    feature_halo,
    features,
    filter_bank,
    filter_bank_halo,
    hessian_eigenvalues,
)
from connectome.em._classifier import PixelClassifier, check_training_labels, load_model, train
from connectome.em._rag import RegionGraph, block_rag, merge_rags
from connectome.em._segment import segment
from connectome.em._synapses import (
    DetectionParams,
    SynapseModel,
    candidate_clefts,
    describe_candidates,
    detect_synapses,
    load_synapse_model,
    match_points,
    merge_duplicates,
    synapse_halo,
    synapse_probability,
    synapse_scores,
    synapse_training_labels,
    train_synapse_model,
)
from connectome.em._watershed import fragment_tile, tile_budget, tiled_fragments, tiles_overlapping, watershed_fragments

__all__ = [
    "DetectionParams",
    "FeatureSpec",
    "MergeTree",
    "PixelClassifier",
    "RegionGraph",
    "SynapseModel",
    "agglomerate",
    "block_rag",
    "candidate_clefts",
    "check_training_labels",
    "choose_mode",
    "cleanup",
    "describe_candidates",
    "detect_synapses",
    "feature_halo",
    "features",
    "filter_bank",
    "filter_bank_halo",
    "hessian_eigenvalues",
    "load_model",
    "load_synapse_model",
    "match_points",
    "merge_duplicates",
    "merge_rags",
    "mutex_watershed",
    "segment",
    "synapse_halo",
    "synapse_probability",
    "synapse_scores",
    "synapse_training_labels",
    "threshold_lookup",
    "train",
    "train_synapse_model",
    "fragment_tile",
    "tile_budget",
    "tiled_fragments",
    "tiles_overlapping",
    "watershed_fragments",
]
