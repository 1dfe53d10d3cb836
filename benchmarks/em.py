"""EM segmentation throughput and peak memory, side by side with the usual alternatives.

Throughput: a synthetic serial-section volume (``connectome.synth.em.make_volume``,
default 512 × 512 × 512 voxels at 40 × 8 × 8 nm, seed 0, with exact ground truth)
is written to a dataset store; ``connectome em --stages boundaries`` makes the
boundary map once. Then each method turns that same map into a segmentation,
each in a fresh process:

* ``connectome``: the fragments and agglomeration stages, blockwise over the
  store (threaded scheduler, one process, so the process's peak is the peak);
* ``skimage+scipy``: what a script on the whole volume does — distance
  transform (scipy), its maxima as seeds, one scikit-image watershed of the
  whole volume (no agglomeration);
* ``waterz`` (0.10, from a separate virtual environment given by
  ``--peer-python``): affinities from the boundary map
  (``aff_d(p) = 1 - max(b(p), b(p - e_d))``), its own watershed and mean
  affinity agglomeration, at several thresholds (the best is reported, which
  favours it).

Time excludes imports and reading the inputs; peak memory is the child's
VmHWM (and the part above what it held before the timed part). VI (split,
merge) and adapted Rand error are against the ground truth. connectome also
runs on the first quarter of the volume (128 sections), to show that its
peak depends on the block size, not on the volume.

``--accuracy`` runs the real-data evaluations at full size instead
(../shared/data): gala FIB-SEM (classifier trained on the half x < 100 of the
train block, the other half segmented) and ISBI 2012 (trained on sections
0–9, sections 10–19 segmented one by one).

Run: ``python benchmarks/em.py --json benchmarks/results/em.json``
     ``python benchmarks/em.py --accuracy``
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
REPO = HERE.parent

PRELUDE = r"""
import json, sys, time
def hwm_mb():
    for line in open("/proc/self/status"):
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
"""

CONNECTOME = PRELUDE + r"""
store, block, out = sys.argv[1], json.loads(sys.argv[2]), sys.argv[3]
from connectome.io import Dataset
from workflows.cluster import executor
from workflows.em import run_em
ds = Dataset(store)
base = hwm_mb()
t0 = time.perf_counter()
with executor("threads") as ex:
    m = run_em(ds, ["fragments", "agglomeration"], config={"em": {"block_shape": block, "chunks": [32, 256, 256]}},
               executor=ex, overwrite=("fragments", "agglomeration"), show_progress=False)
seconds = time.perf_counter() - t0
print(json.dumps({"seconds": seconds, "peak_mb": hwm_mb(), "above_mb": hwm_mb() - base, "metrics": m}))
"""

BOUNDARIES = PRELUDE + r"""
store, block = sys.argv[1], json.loads(sys.argv[2])
from connectome.io import Dataset
from workflows.cluster import executor
from workflows.em import run_em
ds = Dataset(store)
base = hwm_mb()
t0 = time.perf_counter()
with executor("threads") as ex:
    run_em(ds, ["boundaries"], config={"em": {"block_shape": block, "chunks": [32, 256, 256]}}, executor=ex,
           overwrite=("boundaries",), show_progress=False)
seconds = time.perf_counter() - t0
print(json.dumps({"seconds": seconds, "peak_mb": hwm_mb(), "above_mb": hwm_mb() - base}))
"""

SKIMAGE = PRELUDE + r"""
import numpy as np
bnd, out, vs = sys.argv[1], sys.argv[2], json.loads(sys.argv[3])
b = np.load(bnd).astype(np.float32) / 255
base = hwm_mb()
t0 = time.perf_counter()
import scipy.ndimage as ndi
from skimage.segmentation import watershed
inside = b < 0.3
dist = ndi.distance_transform_edt(inside, sampling=vs)
dist = ndi.gaussian_filter(dist, 1.0)
peaks = (dist == ndi.maximum_filter(dist, size=(1, 7, 7))) & inside
markers, n = ndi.label(peaks)
seg = watershed(b, markers)
seconds = time.perf_counter() - t0
np.save(out, seg)
print(json.dumps({"seconds": seconds, "peak_mb": hwm_mb(), "above_mb": hwm_mb() - base, "n_seeds": int(n)}))
"""

WATERZ = PRELUDE + r"""
import numpy as np
bnd, out, thresholds = sys.argv[1], sys.argv[2], json.loads(sys.argv[3])
b = np.load(bnd)
base = hwm_mb()
t0 = time.perf_counter()
import waterz
p = b.astype(np.float32) / 255
affs = np.empty((3,) + p.shape, np.float32)
for d in range(3):
    a = affs[d]
    a[...] = 0.0
    sl_hi = [slice(None)] * 3; sl_lo = [slice(None)] * 3
    sl_hi[d] = slice(1, None); sl_lo[d] = slice(None, -1)
    a[tuple(sl_hi)] = 1.0 - np.maximum(p[tuple(sl_hi)], p[tuple(sl_lo)])
del p
saving = 0.0
for i, seg in enumerate(waterz.agglomerate(affs, thresholds)):
    t1 = time.perf_counter()
    np.save(f"{out}-t{i}.npy", seg.astype(np.uint32))  # saving is not timed
    saving += time.perf_counter() - t1
seconds = time.perf_counter() - t0 - saving
print(json.dumps({"seconds": seconds, "peak_mb": hwm_mb(), "above_mb": hwm_mb() - base}))
"""


def child(code: str, args, python=None, env=None) -> dict:
    python = python or sys.executable
    run_env = {**os.environ, "PYTHONPATH": str(REPO), **(env or {})}
    proc = subprocess.run([python, "-c", code, *map(str, args)], capture_output=True, text=True, env=run_env)
    if proc.returncode != 0:
        raise RuntimeError(f"child failed ({proc.returncode}): {proc.stderr[-2000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def synthetic(cache: Path, shape, seed: int):
    """The benchmark volume and its labels, drawn once and cached (it takes minutes at 512³)."""
    tag = "x".join(map(str, shape)) + f"-s{seed}"
    img_p, lab_p = cache / f"em-{tag}-image.npy", cache / f"em-{tag}-labels.npy"
    if img_p.exists() and lab_p.exists():
        return np.load(img_p, mmap_mode="r"), np.load(lab_p, mmap_mode="r")
    from connectome.synth.em import make_volume

    cache.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    image, truth = make_volume(shape, seed=seed)
    print(f"  synthetic volume {shape}: {time.perf_counter() - t0:.0f} s", flush=True)
    np.save(img_p, image)
    np.save(lab_p, truth.labels.astype(np.uint32))
    return np.load(img_p, mmap_mode="r"), np.load(lab_p, mmap_mode="r")


def make_store(path: Path, image, voxel_size=(40.0, 8.0, 8.0)):
    from connectome.io import Dataset, axes_for, create_multiscale
    from workflows.pyramid import build_pyramid

    ds = Dataset.create(path, overwrite=True)
    g = create_multiscale(ds.root, "raw", shape=image.shape, dtype=image.dtype, chunks=(32, 256, 256),
                          axes=axes_for("em", 3), scale=voxel_size)
    for z in range(0, image.shape[0], 32):
        g["0"][z : z + 32] = np.asarray(image[z : z + 32])
    build_pyramid(g)
    ds.root.attrs["connectome"] = {"kind": "em"}
    return ds


def scores(seg, labels) -> dict:
    from connectome.metrics import adapted_rand_error, variation_of_information

    split, merge = variation_of_information(seg, labels, ignore_gt=())
    return {"vi_split": split, "vi_merge": merge, "vi": split + merge,
            "are": adapted_rand_error(seg, labels, ignore_gt=())}


def throughput(args) -> dict:
    shape = tuple(int(s) for s in args.shape.split(","))
    block = [int(b) for b in args.block.split(",")]
    cache = Path(args.cache)
    image, labels = synthetic(cache, shape, args.seed)
    mvox = float(np.prod(shape)) / 1e6
    work = Path(tempfile.mkdtemp(prefix="em-bench-", dir=args.work))
    results = {"shape": list(shape), "block_shape": block, "voxel_size": [40, 8, 8], "rows": []}
    try:
        ds = make_store(work / "bench.zarr", image)
        print("boundaries (filter bank) ...", flush=True)
        r = child(BOUNDARIES, [ds.path, json.dumps(block)])
        results["boundaries"] = {**r, "mvox_per_s": mvox / r["seconds"]}
        print(f"  {r['seconds']:.1f} s, {mvox / r['seconds']:.2f} MVox/s, peak {r['peak_mb']:.0f} MB", flush=True)
        bnd = work / "boundaries.npy"
        np.save(bnd, ds.array("em/boundaries")[...])

        def row(method, r, seg, extra=None):
            sc = scores(seg, labels)
            out = {"method": method, "seconds": r["seconds"], "mvox_per_s": mvox / r["seconds"],
                   "peak_mb": r["peak_mb"], "above_mb": r["above_mb"], **sc, **(extra or {})}
            results["rows"].append(out)
            print(f"  {method}: {r['seconds']:.1f} s, {out['mvox_per_s']:.2f} MVox/s, peak {r['peak_mb']:.0f} MB, "
                  f"VI {sc['vi_split']:.2f} + {sc['vi_merge']:.2f}, ARE {sc['are']:.3f}", flush=True)

        methods = set(args.methods.split(","))
        if "connectome" in methods:
            print("connectome fragments + agglomeration ...", flush=True)
            r = child(CONNECTOME, [ds.path, json.dumps(block), ""])
            row("connectome (blockwise)", r, ds.array("em/segmentation")[...], {"metrics": r["metrics"]})

            # the same on a quarter of the volume: the peak does not follow the volume
            quarter = (shape[0] // 4,) + shape[1:]
            dq = make_store(work / "quarter.zarr", image[: quarter[0]])
            child(BOUNDARIES, [dq.path, json.dumps(block)])
            rq = child(CONNECTOME, [dq.path, json.dumps(block), ""])
            results["connectome_quarter"] = {"shape": list(quarter), **rq,
                                             "mvox_per_s": float(np.prod(quarter)) / 1e6 / rq["seconds"]}
            print(f"  connectome on {quarter}: {rq['seconds']:.1f} s, peak {rq['peak_mb']:.0f} MB", flush=True)
            shutil.rmtree(dq.path)

        if "skimage" in methods:
            print("scikit-image + scipy, whole volume ...", flush=True)
            out = work / "skimage.npy"
            try:
                r = child(SKIMAGE, [bnd, out, json.dumps([40, 8, 8])])
                row("scikit-image watershed + scipy (whole volume)", r, np.load(out), {"n_seeds": r["n_seeds"]})
                out.unlink()
            except RuntimeError as e:
                results["rows"].append({"method": "scikit-image + scipy", "error": str(e)[-300:]})
                print(f"  failed: {str(e)[-300:]}")

        if "waterz" in methods and args.peer_python and Path(args.peer_python).exists():
            print("waterz ...", flush=True)
            thresholds = [0.15, 0.2, 0.25, 0.3]
            out = work / "waterz"
            try:
                r = child(WATERZ, [bnd, out, json.dumps(thresholds)], python=args.peer_python,
                          env={"PYTHONPATH": ""})
                best = None
                for i, t in enumerate(thresholds):
                    seg = np.load(f"{out}-t{i}.npy")
                    sc = scores(seg, labels)
                    if best is None or sc["vi"] < best[1]["vi"]:
                        best = (t, sc, i)
                    del seg
                row("waterz 0.10 (whole volume)", r, np.load(f"{out}-t{best[2]}.npy"),
                    {"threshold": best[0], "thresholds": thresholds})
            except RuntimeError as e:
                results["rows"].append({"method": "waterz", "error": str(e)[-300:]})
                print(f"  failed: {str(e)[-300:]}")
        elif "waterz" in methods:
            print("waterz: skipped (no --peer-python)")
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return results


def accuracy(args) -> dict:
    """gala FIB-SEM and ISBI 2012 at full size (see the module docstring)."""
    import h5py
    import scipy.ndimage as ndi
    import tifffile
    import zarr

    from connectome.io import Dataset
    from connectome.metrics import adapted_rand_error, variation_of_information
    from workflows.em import run_em, train_model

    shared = Path(args.shared)
    out = {}
    with tempfile.TemporaryDirectory(dir=args.work) as tmp:
        tmp = Path(tmp)
        # gala: train on x < 100, segment x >= 100 (3-D)
        with h5py.File(shared / "gala-fibsem/train-image.h5", "r") as f:
            image = f["stack"][...]
        with h5py.File(shared / "gala-fibsem/train-gt.lzf.h5", "r") as f:
            gt = f["stack"][...]
        ds = Dataset.create(tmp / "gala.zarr")
        ds.write_raw(image, kind="em", scale=(10.0, 10.0, 10.0), chunks=(25, 50, 50))
        labels = np.where(gt == 0, 2, 1).astype(np.uint8)
        labels[:, :, 100:] = 0
        zarr.create_array(str(tmp / "gala-labels.zarr"), data=labels, chunks=(25, 50, 50), zarr_format=3)
        cfg = {"em": {"block_shape": [50, 100, 100], "chunks": [25, 50, 50]}}
        t0 = time.perf_counter()
        train_model(ds, tmp / "gala-labels.zarr", tmp / "gala.npz", show_progress=False,
                    config={"em": {"block_shape": [50, 100, 200], "chunks": [25, 50, 50]}})
        run_em(ds, config=cfg, boundary_model=str(tmp / "gala.npz"), show_progress=False)
        seg = ds.array("em/segmentation")[:, :, 100:]
        split, merge = variation_of_information(seg, gt[:, :, 100:])
        out["gala"] = {"vi_split": split, "vi_merge": merge, "are": adapted_rand_error(seg, gt[:, :, 100:]),
                       "seconds": time.perf_counter() - t0, "n_segments": int(len(np.unique(seg))),
                       "tile": "default (32, 256, 256)"}
        print(f"gala FIB-SEM (test half x >= 100): VI {split:.3f} (split) + {merge:.3f} (merge) = "
              f"{split + merge:.3f}, ARE {out['gala']['are']:.3f}   [gala on its test block: 0.395 + 0.234]")
        # the fragment tile is a parameter of the method: the tile of tests/test_em_real.py too
        for tile in ([50, 100, 100],):
            run_em(ds, ["fragments", "agglomeration"], config={**cfg, "fragments": {"tile": tile}},
                   overwrite=("fragments", "agglomeration"), show_progress=False)
            seg = ds.array("em/segmentation")[:, :, 100:]
            split, merge = variation_of_information(seg, gt[:, :, 100:])
            out[f"gala_tile_{'x'.join(map(str, tile))}"] = {
                "vi_split": split, "vi_merge": merge, "are": adapted_rand_error(seg, gt[:, :, 100:]),
                "n_segments": int(len(np.unique(seg))), "tile": tile}
            print(f"  with fragment tile {tile}: VI {split:.3f} + {merge:.3f}, "
                  f"ARE {adapted_rand_error(seg, gt[:, :, 100:]):.3f}")
        # ISBI 2012: train on 0-9, segment 10-19 one section at a time
        image = tifffile.imread(shared / "isbi2012/train-volume-0-19.tif")
        raw_labels = tifffile.imread(shared / "isbi2012/train-labels-0-19.tif")
        ds = Dataset.create(tmp / "isbi.zarr")
        ds.write_raw(image, kind="em", scale=(50.0, 4.0, 4.0), chunks=(10, 256, 256))
        labels = np.where(raw_labels == 0, 2, 1).astype(np.uint8)
        labels[10:] = 0
        tifffile.imwrite(tmp / "isbi-labels.tif", labels)
        cfg = {"em": {"block_shape": [10, 512, 512], "chunks": [10, 256, 256]},
               "agglomeration": {"threshold": 0.75, "min_size": 50, "link_sections": False}}
        t0 = time.perf_counter()
        train_model(ds, tmp / "isbi-labels.tif", tmp / "isbi.npz", config=cfg, show_progress=False)
        run_em(ds, config=cfg, boundary_model=str(tmp / "isbi.npz"), show_progress=False)
        seg = ds.array("em/segmentation")[10:]
        errors = [adapted_rand_error(seg[z], ndi.label(raw_labels[10 + z] == 255)[0]) for z in range(10)]
        out["isbi2012"] = {"are_per_section": errors, "are_mean": float(np.mean(errors)),
                           "seconds": time.perf_counter() - t0, "tile": "default (1, 256, 256)"}
        print(f"ISBI 2012 sections 10-19: adapted Rand error mean {np.mean(errors):.4f} "
              f"(per section {', '.join(f'{e:.3f}' for e in errors)})   [U-Net, hidden test set: 0.038]")
        tile = [1, 512, 512]  # whole sections: no tile faces
        run_em(ds, ["fragments", "agglomeration"], config={**cfg, "fragments": {"tile": tile}},
               overwrite=("fragments", "agglomeration"), show_progress=False)
        seg = ds.array("em/segmentation")[10:]
        errors = [adapted_rand_error(seg[z], ndi.label(raw_labels[10 + z] == 255)[0]) for z in range(10)]
        out["isbi2012_whole_sections"] = {"are_per_section": errors, "are_mean": float(np.mean(errors)),
                                          "tile": tile}
        print(f"  with whole-section tiles {tile}: adapted Rand error mean {np.mean(errors):.4f}")
    return out


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--shape", default="512,512,512", help="Z,Y,X of the synthetic volume")
    p.add_argument("--block", default="64,256,256", help="connectome's block shape")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--cache", default=os.path.join(tempfile.gettempdir(), "connectome-bench-em"),
                   help="where the synthetic volume is kept between runs")
    p.add_argument("--work", default=None, help="scratch folder (default: the system's temp)")
    p.add_argument("--peer-python", default=os.environ.get("EM_PEER_PYTHON", "/tmp/em-peers/bin/python"),
                   help="python of a virtual environment with waterz (pip install waterz==0.10.*)")
    p.add_argument("--methods", default="connectome,skimage,waterz", help="which methods to run")
    p.add_argument("--accuracy", action="store_true", help="gala and ISBI 2012 at full size instead")
    p.add_argument("--shared", default=str(REPO.parent / "shared" / "data"))
    p.add_argument("--json", default=None, help="write the results here")
    args = p.parse_args(argv)
    results = accuracy(args) if args.accuracy else throughput(args)
    results["date"] = time.strftime("%Y-%m-%d")
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(results, indent=2, default=float))
    return results


if __name__ == "__main__":
    main()
