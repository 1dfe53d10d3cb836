"""Small review stores built from synthetic data and its exact truth.

For the plugin's sample data, its tests and the documentation pictures:
:func:`sample_em` writes an EM store whose segmentation, boundaries and
synapses are the synthetic volume's truth (what a perfect pipeline would
give), so merges and splits can be checked voxel for voxel;
:func:`sample_twophoton` writes a movie with the ROI outputs of the
contract (labels, ``rois.parquet``, footprints, ``dff`` and ``spikes``)
taken from the movie's truth. These are stand-ins for stage outputs, named
as such in the store's attributes (``connectome.sample``); the real stages
write the same formats.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow as pa

from connectome.graph import _store as st
from connectome.graph import aggregate_edges, block_statistics, neuron_table, with_degrees
from connectome.io import Dataset, create_multiscale
from connectome.io.ome import write_multiscale


def _label_image(ds: Dataset, name: str, labels: np.ndarray, chunks, levels: bool = True):
    group = create_multiscale(ds.root, name, shape=labels.shape, dtype=labels.dtype, chunks=chunks,
                              axes=ds.spatial_axes(labels.ndim), scale=ds.voxel_size, labels=True, levels=levels,
                              overwrite=True)
    write_multiscale(group, labels)
    return group


def sample_em(path, *, shape=(24, 96, 96), voxel_size=(40, 8, 8), seed: int = 0, n_synapses: int | None = 30,
              chunks=(8, 32, 32), overwrite: bool = True):
    """Write an EM review store: raw, boundaries, segmentation (= truth), synapses and graph tables.

    Parameters
    ----------
    path : str or Path
        The new ``NAME.zarr``.
    shape, voxel_size, seed, n_synapses
        Passed to :func:`connectome.synth.em.make_volume`.
    chunks : tuple of 3 int
        Chunks of every image (small, so edits touch few voxels per chunk).

    Returns
    -------
    (Dataset, EMTruth)
    """
    from connectome.synth.em import make_volume

    image, truth = make_volume(tuple(shape), voxel_size=tuple(voxel_size), seed=seed, n_synapses=n_synapses)
    ds = Dataset.create(path, overwrite=overwrite)
    ds.write_raw(image, kind="em", scale=voxel_size, chunks=chunks)
    boundaries = np.where(truth.boundaries, 255, 0).astype(np.uint8)
    g = create_multiscale(ds.root, "em/boundaries", shape=shape, dtype=np.uint8, chunks=chunks,
                          axes=ds.spatial_axes(3), scale=voxel_size, overwrite=True)
    write_multiscale(g, boundaries)
    _label_image(ds, "em/segmentation", truth.labels.astype(np.uint64), chunks)
    stats = neuron_table(block_statistics(truth.labels.astype(np.uint64)))
    neurons = pa.table({k: pa.array(v) for k, v in stats.items()})
    syn = truth.synapses
    cols = {c: pa.array(np.asarray(syn[c])) for c in ("synapse_id", "pre_z", "pre_y", "pre_x", "post_z", "post_y",
                                                       "post_x", "size")}
    cols["score"] = pa.array(np.ones(len(syn["synapse_id"])))
    cols["pre_id"] = pa.array(np.asarray(syn["pre_id"], np.uint64))
    cols["post_id"] = pa.array(np.asarray(syn["post_id"], np.uint64))
    st.write_table(ds, st.SYNAPSES, pa.table(cols))
    edges = aggregate_edges(np.asarray(syn["pre_id"], np.uint64), np.asarray(syn["post_id"], np.uint64),
                            np.asarray(syn["size"], np.int64))
    st.write_table(ds, st.EDGES, st.edges_table(edges), sorting=["pre_id", "post_id"])
    neurons = with_degrees(neurons, edges["pre_id"], edges["post_id"], edges["n_synapses"])
    st.write_table(ds, st.NEURONS, neurons, sorting=["neuron_id"])
    ds.root.attrs["connectome"] = {**ds.root.attrs.get("connectome", {}), "kind": "em",
                                   "sample": "synthetic EM; segmentation, boundaries and synapses are the truth"}
    return ds, truth


def sample_twophoton(path, *, shape=(200, 96, 96), frame_rate: float = 15.0, seed: int = 0, chunks=None,
                     overwrite: bool = True):
    """Write a two-photon review store: movie, registered movie, summary images and ROI outputs.

    The movie has no motion, so the registered movie is the raw one as
    float32; summary images come from :func:`connectome.twophoton.summary`;
    ROIs, traces (``dff`` = the true calcium, ``spikes`` = the true spike
    counts) and ``snr`` (peak ΔF/F over its robust noise) come from the truth.

    Returns
    -------
    (Dataset, TwoPhotonTruth)
    """
    from connectome.synth.twophoton import make_movie
    from connectome.twophoton.summary import partial_stats, summary_images

    movie, truth = make_movie(tuple(shape), frame_rate=frame_rate, motion="none", seed=seed)
    T = movie.shape[0]
    chunks = tuple(chunks or (min(T, 100),) + tuple(movie.shape[1:]))
    ds = Dataset.create(path, overwrite=overwrite)
    ds.write_raw(movie, kind="twophoton", scale=(1.0 / frame_rate,) + tuple(truth.voxel_size), chunks=chunks)
    axes = ds.raw_info.axes
    g = create_multiscale(ds.root, "twophoton/registered", shape=movie.shape, dtype="float32", chunks=chunks,
                          axes=axes, scale=ds.raw_info.scale, overwrite=True)
    write_multiscale(g, movie.astype(np.float32))
    images = summary_images(partial_stats(movie.astype(np.float32)))
    for name in ("mean", "max", "correlation"):
        img = np.asarray(images[name], np.float32)
        s = create_multiscale(ds.root, f"twophoton/summary/{name}", shape=img.shape, dtype="float32",
                              chunks=img.shape, axes=ds.spatial_axes(img.ndim), scale=ds.voxel_size, levels=False,
                              overwrite=True)
        s["0"][...] = img
    labels = truth.labels.astype(np.int32)
    _label_image(ds, "twophoton/rois/labels", labels, labels.shape, levels=False)
    n = int(truth.footprints.shape[0])
    ids = np.arange(1, n + 1)
    area = np.bincount(labels.ravel(), minlength=n + 1)[1:]
    dff = truth.calcium.astype(np.float32)
    noisy = dff + np.random.default_rng(seed).normal(0, 0.05, dff.shape).astype(np.float32)
    noise = 1.4826 * np.median(np.abs(np.diff(noisy, axis=1)), axis=1) / np.sqrt(2)
    snr = (noisy.max(axis=1) / np.maximum(noise, 1e-6)).astype(np.float32)
    cen = truth.centroids
    rois = {"roi_id": ids.astype(np.int64), "z": np.zeros(n) if cen.shape[1] == 2 else cen[:, 0],
            "y": cen[:, -2], "x": cen[:, -1], "area": area.astype(np.int64), "snr": snr,
            "accepted": area > 0}
    ds.write_table("twophoton/rois", rois)
    fp = []
    for k in range(n):
        idx = np.nonzero(truth.footprints[k] > 0.05)
        w = truth.footprints[k][idx]
        fp.append({"roi_id": np.full(w.size, k + 1, np.int64), "z": np.zeros(w.size, np.int64) if len(idx) == 2
                   else idx[0].astype(np.int64), "y": idx[-2].astype(np.int64), "x": idx[-1].astype(np.int64),
                   "weight": w.astype(np.float32)})
    ds.write_table("twophoton/footprints", {c: np.concatenate([f[c] for f in fp]) for c in fp[0]})
    for name, values in (("dff", noisy), ("spikes", truth.spikes.astype(np.float32))):
        a = ds.create_output(f"twophoton/traces/{name}", shape=values.shape, dtype="float32",
                             chunks=(min(n, 64), T), stage="sample", overwrite=True)
        a[...] = values
        ds.mark_complete(f"twophoton/traces/{name}")
    ds.root.attrs["connectome"] = {**ds.root.attrs.get("connectome", {}), "kind": "twophoton",
                                   "sample": "synthetic two-photon; ROIs and traces are the truth"}
    return ds, truth


def sample_stores(out, *, seed: int = 0) -> dict[str, Path]:
    """Both sample stores in ``out`` (``em.zarr``, ``twophoton.zarr``); returns their paths."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    sample_em(out / "em.zarr", seed=seed)
    sample_twophoton(out / "twophoton.zarr", seed=seed)
    return {"em": out / "em.zarr", "twophoton": out / "twophoton.zarr"}
