"""napari plugin for connectome: a view over :mod:`connectome.review` (all logic lives there)."""

__version__ = "0.1.0"

from connectome_napari._reader import napari_get_reader, open_store, read_store

__all__ = ["napari_get_reader", "open_store", "read_store"]
