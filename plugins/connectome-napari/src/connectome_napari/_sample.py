"""napari sample data: small synthetic stores written to a temporary folder and opened."""

from __future__ import annotations

import tempfile
from pathlib import Path

from connectome_napari._reader import read_store


def _folder() -> Path:
    return Path(tempfile.mkdtemp(prefix="connectome-sample-"))


def sample_em():
    """A synthetic EM store whose segmentation, boundaries and synapses are the truth."""
    from connectome.review._sample import sample_em as make

    path = _folder() / "em.zarr"
    make(path)
    return read_store(path)


def sample_twophoton():
    """A synthetic two-photon store whose ROIs and traces are the truth."""
    from connectome.review._sample import sample_twophoton as make

    path = _folder() / "twophoton.zarr"
    make(path)
    return read_store(path)
