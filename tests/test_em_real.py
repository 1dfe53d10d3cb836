"""Real EM data with ground truth nobody on this project made (../shared/data, see its README).

* gala FIB-SEM block (Nunez-Iglesias et al. 2013): the pixel classifier is trained on one half
  of the block (boundary = ground-truth label 0, inside = label > 0) and the other half is
  segmented in 3-D; VI and adapted Rand error against the ground truth.
* ISBI 2012 ssTEM (Arganda-Carreras et al. 2015): trained on sections 0–9, sections 10–19
  segmented per section (2-D mode); adapted Rand error per section against connected
  components of the labels. Crops keep the test short; ``benchmarks/em.py --accuracy`` runs
  the full-size versions.
"""

import numpy as np
import pytest
import scipy.ndimage as ndi
import zarr

from connectome.io import Dataset
from connectome.metrics import adapted_rand_error, variation_of_information
from workflows.em import run_em, train_model


def _store(tmp_path, image, voxel_size, chunks):
    ds = Dataset.create(tmp_path / "real.zarr")
    ds.write_raw(image, kind="em", scale=voxel_size, chunks=chunks)
    return ds


def test_gala_fibsem_half_block(tmp_path, shared_data):
    h5py = pytest.importorskip("h5py")
    folder = shared_data / "gala-fibsem"
    with h5py.File(folder / "train-image.h5", "r") as f:
        image = f["stack"][...]
    with h5py.File(folder / "train-gt.lzf.h5", "r") as f:
        gt = f["stack"][...]
    vs = (10.0, 10.0, 10.0)  # near-isotropic FIB-SEM: only the ratios matter
    ds = _store(tmp_path, image, vs, (25, 50, 50))
    labels = np.where(gt == 0, 2, 1).astype(np.uint8)
    labels[:, :, 100:] = 0  # train on x < 100 only
    zarr.create_array(str(tmp_path / "labels.zarr"), data=labels, chunks=(25, 50, 50), zarr_format=3)
    info = train_model(ds, tmp_path / "labels.zarr", tmp_path / "gala.npz", n_trees=16, max_depth=12,
                       max_samples=60_000, config={"em": {"block_shape": [50, 100, 200], "chunks": [25, 50, 50]}},
                       show_progress=False)
    assert info["mode"] == "3d"
    # fragment tiles of half the block (x < 100, x >= 100): aligned with the first grid, so no tile is
    # computed twice there (the default tile, 32 × 256 × 256, straddles these small blocks: slower)
    tile = {"tile": [50, 100, 100]}
    cfg = {"em": {"block_shape": [50, 100, 100], "chunks": [25, 50, 50]}, "fragments": tile}
    run_em(ds, config=cfg, boundary_model=str(tmp_path / "gala.npz"), show_progress=False)
    seg = ds.array("em/segmentation")[:, :, 100:]
    # another block grid gives the same segmentation (block-size invariance on real data)
    cfg2 = {"em": {"block_shape": [25, 50, 100], "chunks": [25, 50, 50]}, "fragments": tile}
    run_em(ds, ["fragments", "agglomeration"], config=cfg2, overwrite=("fragments", "agglomeration"),
           show_progress=False)
    again = ds.array("em/segmentation")[:, :, 100:]
    assert sum(variation_of_information(again, seg, ignore_gt=())) <= 0.01
    np.testing.assert_array_equal(again, seg)  # fragments on a fixed tile lattice: equal, not just close
    split, merge = variation_of_information(seg, gt[:, :, 100:])  # ground-truth label 0 ignored (gala's convention)
    are = adapted_rand_error(seg, gt[:, :, 100:])
    # measured 0.24 + 0.08 bits, ARE 0.024 with the full forest (benchmarks/em.py --accuracy);
    # gala's published result on its own test block is VI 0.395 + 0.234
    assert split + merge < 0.6 and are < 0.08, (split, merge, are)


def test_isbi2012_sections_per_slice(tmp_path, shared_data):
    tifffile = pytest.importorskip("tifffile")
    folder = shared_data / "isbi2012"
    crop = (slice(0, 20), slice(0, 256), slice(0, 256))
    image = tifffile.imread(folder / "train-volume-0-19.tif")[crop]
    raw_labels = tifffile.imread(folder / "train-labels-0-19.tif")[crop]
    vs = (50.0, 4.0, 4.0)
    ds = _store(tmp_path, image, vs, (10, 128, 128))
    labels = np.where(raw_labels == 0, 2, 1).astype(np.uint8)
    labels[10:] = 0  # train on sections 0-9
    tifffile.imwrite(tmp_path / "labels.tif", labels)
    cfg = {"em": {"block_shape": [10, 256, 256], "chunks": [10, 128, 128]}}
    info = train_model(ds, tmp_path / "labels.tif", tmp_path / "isbi.npz", n_trees=16, max_depth=12,
                       max_samples=60_000, config=cfg, show_progress=False)
    assert info["mode"] == "2d"
    run_em(ds, config={**cfg, "agglomeration": {"threshold": 0.75, "min_size": 50,
                                                                 "link_sections": False}},
           boundary_model=str(tmp_path / "isbi.npz"), show_progress=False)
    seg = ds.array("em/segmentation")[10:]
    errors = []
    for z in range(10):
        truth, _ = ndi.label(raw_labels[10 + z] == 255)  # instances = connected components of the cell interiors
        errors.append(adapted_rand_error(seg[z], truth))
    # full size, full forest: mean 0.104 (benchmarks/em.py --accuracy); U-Net on the hidden test set: 0.038
    assert np.mean(errors) < 0.2, np.round(errors, 3)
