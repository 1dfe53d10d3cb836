"""Reader: a connectome dataset store opens as lazy (Dask) layers with their physical scale."""

from __future__ import annotations

import uuid
from pathlib import Path

STORE_KEY = "connectome_store"  # layer.metadata: the store's path
PATH_KEY = "connectome_path"  # layer.metadata: the array / table path in the store


def napari_get_reader(path):
    """Return :func:`read_store` for a connectome store, None for any other path."""
    from connectome.review import is_store

    if isinstance(path, (list, tuple)):
        if len(path) != 1:
            return None
        path = path[0]
    if not isinstance(path, (str, Path)):
        return None
    try:
        return read_store if is_store(path) else None
    except OSError:
        return None


def lazy_levels(store, paths):
    """Dask arrays over zarr arrays, one per pyramid level; fresh names so no cache returns stale chunks."""
    import dask.array as da
    import zarr

    out = []
    for p in paths:
        arr = zarr.open_array(f"{store}/{p}", mode="r")
        out.append(da.from_zarr(arr, chunks=arr.chunks, name=f"connectome-{p}-{uuid.uuid4().hex[:8]}"))
    return out


def layer_data(store, spec):
    """The napari data of an image / labels :class:`~connectome.review.LayerSpec`: lazy, multiscale where stored so."""
    levels = lazy_levels(store, spec.paths)
    return levels if len(levels) > 1 else levels[0]


def read_store(path) -> list[tuple]:
    """Layer data tuples ``(data, kwargs, kind)`` for every layer of a store (see :func:`connectome.review.store_layers`)."""
    from connectome.review import store_layers

    if isinstance(path, (list, tuple)):
        path = path[0]
    store = str(Path(path).resolve())
    out = []
    for spec in store_layers(store):
        meta = {STORE_KEY: store, PATH_KEY: spec.name.split(" (")[0]}
        kwargs = {"name": spec.name, "metadata": meta}
        if spec.kind in ("image", "labels"):
            data = layer_data(store, spec)
            kwargs.update(scale=spec.scale, axis_labels=spec.axes, units=tuple(u or "pixel" for u in spec.units),
                          multiscale=len(spec.paths) > 1)
            kwargs.update(spec.options)
        else:
            data = spec.data
            kwargs.update(axis_labels=spec.axes, units=tuple(u or "pixel" for u in spec.units))
            kwargs.update(spec.options)
            if spec.properties:
                kwargs["features"] = spec.properties
        out.append((data, kwargs, spec.kind))
    return out


def open_store(viewer, path) -> list:
    """Add a store's layers to ``viewer``; returns the layers."""
    layers = []
    for data, kwargs, kind in read_store(path):
        layers.append(getattr(viewer, f"add_{kind}")(data, **kwargs))
    return layers
