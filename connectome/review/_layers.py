"""What a viewer should show of a dataset store: one description per layer.

:func:`store_layers` lists the images, label images, points and vectors of a
store with their array paths (every pyramid level), physical scale (from
the OME-NGFF metadata), axis names and units and display hints. It reads
metadata only, plus one chunk per image for the contrast range, so it is
instant on a volume of any size. The napari plugin turns each description
into a lazy (Dask) layer; nothing here depends on a viewer or on Dask.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import zarr

from connectome.errors import StoreError
from connectome.io import Dataset
from connectome.io.ome import read_multiscale

#: (store path, layer kind, display options), in drawing order (later on top).
TWOPHOTON = (
    ("raw", "image", {"colormap": "gray", "visible": False}),
    ("twophoton/registered", "image", {"colormap": "gray"}),
    ("twophoton/summary/mean", "image", {"colormap": "gray", "visible": False}),
    ("twophoton/summary/max", "image", {"colormap": "magma", "visible": False}),
    ("twophoton/summary/correlation", "image", {"colormap": "viridis", "visible": False}),
    ("twophoton/rois/labels", "labels", {"opacity": 0.5}),
)
EM = (
    ("raw", "image", {"colormap": "gray"}),
    ("em/boundaries", "image", {"colormap": "inferno", "visible": False, "blending": "additive"}),
    ("em/fragments", "labels", {"visible": False, "opacity": 0.5}),
    ("em/segmentation", "labels", {"opacity": 0.45}),
)


@dataclass
class LayerSpec:
    """One layer of a store.

    Attributes
    ----------
    name : str
        Layer name (the store path, e.g. ``em/segmentation``).
    kind : {'image', 'labels', 'points', 'vectors'}
    paths : tuple of str
        Array path of each pyramid level, finest first (image / labels).
    scale : tuple of float
        Physical size of a level-0 element along each axis.
    axes, units : tuple of str
        Axis names and units (``t`` in seconds; µm or nm in space).
    options : dict
        Display hints (colormap, opacity, visible, contrast_limits, …).
    data : object
        Points / vectors: the coordinates (level-0 voxels times ``scale``).
    properties : dict
        Points: per-point columns (synapse id, pre / post neuron …).
    """

    name: str
    kind: str
    paths: tuple = ()
    scale: tuple = ()
    axes: tuple = ()
    units: tuple = ()
    options: dict = field(default_factory=dict)
    data: object = None
    properties: dict = field(default_factory=dict)

    @property
    def multiscale(self) -> bool:
        return len(self.paths) > 1


def _contrast(arr: zarr.Array) -> list[float]:
    """Contrast range from the dtype or, for wide types, from one central chunk."""
    dt = np.dtype(arr.dtype)
    if dt == np.uint8:
        return [0.0, 255.0]
    if dt == np.bool_:
        return [0.0, 1.0]
    centre = tuple(slice((s // 2 // c) * c, min((s // 2 // c) * c + c, s)) for s, c in zip(arr.shape, arr.chunks))
    block = np.asarray(arr[centre], np.float64)
    finite = block[np.isfinite(block)]
    if finite.size == 0:
        return [0.0, 1.0]
    lo, hi = np.percentile(finite, [0.5, 99.8])
    if hi <= lo:
        hi = lo + 1.0
    return [float(lo), float(hi)]


def _image_spec(ds: Dataset, name: str, kind: str, options: dict) -> LayerSpec | None:
    node = ds.root[name]
    options = dict(options)
    if isinstance(node, zarr.Group):
        try:
            info = read_multiscale(node, where=f"{ds.path.name}/{name}")
        except StoreError:
            return None
        paths = tuple(f"{name}/{p}" for p in info.paths)
        scale, axes, units = info.scale, info.axes.names, tuple(u or "" for u in info.axes.units)
        level0 = node[info.paths[0]]
    else:  # a plain array (brought by the user or a stage): scale from the raw image
        level0 = node
        paths = (name,)
        try:
            raw = ds.raw_info
        except StoreError:
            raw = None
        if raw is not None and len(raw.scale) == node.ndim:
            scale, axes, units = raw.scale, raw.axes.names, tuple(u or "" for u in raw.axes.units)
        elif raw is not None and len(raw.axes.spatial) == node.ndim:
            sp = raw.axes.spatial
            scale = tuple(raw.scale[i] for i in sp)
            axes = tuple(raw.axes.names[i] for i in sp)
            units = tuple(raw.axes.units[i] or "" for i in sp)
        else:
            scale, axes, units = (1.0,) * node.ndim, ("z", "y", "x")[-node.ndim:], ("",) * node.ndim
    if kind == "image":
        coarse = ds.root[paths[-1]]
        options.setdefault("contrast_limits", _contrast(coarse))
    elif np.dtype(level0.dtype).kind not in "uib":
        return None
    incomplete = not ds.is_complete(name)
    title = name + (" (incomplete)" if incomplete else "")
    return LayerSpec(title, kind, paths, tuple(float(s) for s in scale), tuple(axes), tuple(units), options)


def synapse_layers(ds: Dataset, scale, units=("nanometer",) * 3) -> list[LayerSpec]:
    """Synapses as points (pre-synaptic sites) and vectors (pre → post), in physical units."""
    from connectome.graph import _store as st

    table = st.read_store_table(ds, st.SYNAPSES, optional=True)
    if table is None:
        return []
    names = [f"{side}_{a}" for side in ("pre", "post") for a in "zyx"]
    if not all(n in table.column_names for n in names):
        return []
    pre = np.stack([table.column(f"pre_{a}").to_numpy(zero_copy_only=False) for a in "zyx"], 1).astype(np.float64)
    post = np.stack([table.column(f"post_{a}").to_numpy(zero_copy_only=False) for a in "zyx"], 1).astype(np.float64)
    s = np.asarray(scale, np.float64)
    props = {c: table.column(c).to_numpy(zero_copy_only=False) for c in ("synapse_id", "pre_id", "post_id")
             if c in table.column_names}
    vectors = np.stack([pre * s, (post - pre) * s], axis=1)
    return [
        LayerSpec("em/synapses", "points", scale=(1.0, 1.0, 1.0), axes=("z", "y", "x"), units=tuple(units), data=pre * s,
                  properties=props, options={"face_color": "cyan", "size": float(3 * s[-1]), "border_width": 0}),
        LayerSpec("em/synapses pre→post", "vectors", scale=(1.0, 1.0, 1.0), axes=("z", "y", "x"), units=tuple(units),
                  data=vectors,
                  options={"edge_color": "yellow", "edge_width": float(s[-1]), "vector_style": "arrow"}),
    ]


def store_layers(dataset) -> list[LayerSpec]:
    """Every layer a viewer should open for a store, in drawing order.

    Parameters
    ----------
    dataset : str, Path or Dataset

    Returns
    -------
    list of LayerSpec
        Images and label images present in the store (two-photon: raw,
        registered, summary images, ROI labels; EM: raw, boundaries,
        fragments, segmentation) and, for EM, synapse points and vectors.
    """
    ds = dataset if isinstance(dataset, Dataset) else Dataset(dataset, mode="r")
    kind = ds.kind if "raw" in ds else ("em" if any(n in ds for n, _, _ in EM[1:]) else "twophoton")
    out = []
    for name, layer_kind, options in (TWOPHOTON if kind == "twophoton" else EM):
        if name in ds:
            spec = _image_spec(ds, name, layer_kind, options)
            if spec is not None:
                out.append(spec)
    if kind == "em":
        ref = next((s for s in out if s.name.startswith(("em/segmentation", "raw"))), None)
        if ref is not None:
            scale, units = ref.scale, ref.units
        else:
            try:
                scale, units = ds.voxel_size, ("nanometer",) * 3
            except StoreError:
                scale, units = (1.0, 1.0, 1.0), ("",) * 3
        out += synapse_layers(ds, scale, units)
    return out


def is_store(path) -> bool:
    """True for a directory that is a Zarr v3 group holding a ``raw`` image or connectome outputs."""
    from pathlib import Path

    p = Path(path)
    if not (p.is_dir() and (p / "zarr.json").is_file()):
        return False
    return any((p / n).exists() for n in ("raw", "twophoton", "em"))
