"""Synapse detection: throughput and accuracy, side by side with a classifier-free baseline.

Data: synthetic serial-section EM (``connectome.synth.em.make_volume``,
40 × 8 × 8 nm) with exact synapse truth. The detector is trained on one
volume (seed 1, ``--train-shape``) from sparse labels made from its truth
(:func:`connectome.em.synapse_training_labels`); it is scored on a larger
volume (seed 2, ``--shape``) that it never saw.

Methods:

* ``connectome``: ``workflows.synapses.run_synapses`` blockwise over a
  dataset store (threaded scheduler), partners on the true segmentation;
* ``dark blobs`` (peer baseline, no classifier): the image smoothed at
  ~24 nm, thresholded, opened in-plane (thin membranes go, thick dark
  patches stay), connected components above a size; the threshold and the
  opening are tuned for the best F1 on the training volume, which favours
  it. It gives centres only, so only detection is scored.

Scores: precision / recall / F1 of centres matched one-to-one within 300 nm;
for connectome also partner accuracy (matched synapses with the true
(pre_id, post_id)) and edge F1 over the (pre, post) pairs. Throughput in
MVox/s of the whole stage (reads, halo, detection, table).

Run: ``python benchmarks/synapses.py --json benchmarks/results/synapses.json``
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from datetime import date
from pathlib import Path

import numpy as np
from scipy import ndimage as ndi

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from connectome.em._synapses import synapse_scores, synapse_training_labels, train_synapse_model  # noqa: E402
from connectome.io import Dataset, create_multiscale  # noqa: E402
from connectome.synth.em import make_volume  # noqa: E402

VS = (40.0, 8.0, 8.0)


def dark_blobs(image, *, threshold: float, opening: int, min_size: int = 40):
    """Baseline: centroids of thick dark patches (smoothed, thresholded, opened in-plane)."""
    img = image.astype(np.float32) / 255.0
    smooth = ndi.gaussian_filter(img, (0, 3.0, 3.0))
    mask = smooth < threshold
    if opening:
        disk = np.zeros((1, 2 * opening + 1, 2 * opening + 1), bool)
        yy, xx = np.mgrid[-opening:opening + 1, -opening:opening + 1]
        disk[0] = yy**2 + xx**2 <= opening**2
        mask = ndi.binary_opening(mask, structure=disk)
    cc, n = ndi.label(mask)
    if n == 0:
        return np.zeros((0, 3))
    idx = np.arange(1, n + 1)
    size = ndi.sum_labels(np.ones(cc.shape, np.int32), cc, idx)
    keep = idx[size >= min_size]
    return np.array(ndi.center_of_mass(np.ones(cc.shape), cc, keep)).reshape(-1, 3)


def centres(points):
    return {f"center_{a}": points[:, k] for k, a in enumerate("zyx")} | {
        "pre_id": np.zeros(len(points), np.uint64), "post_id": np.ones(len(points), np.uint64)}


def tune_baseline(image, truth):
    best = None
    for threshold in (0.35, 0.4, 0.45, 0.5):
        for opening in (1, 2, 3):
            s = synapse_scores(centres(dark_blobs(image, threshold=threshold, opening=opening)), truth.synapses, VS)
            if best is None or s["f1"] > best[0]:
                best = (s["f1"], threshold, opening)
    return {"threshold": best[1], "opening": best[2], "train_f1": best[0]}


def make_store(path: Path, image, labels, chunks):
    ds = Dataset.create(path, overwrite=True)
    ds.write_raw(image, kind="em", scale=VS, chunks=chunks)
    seg = create_multiscale(ds.root, "em/segmentation", shape=labels.shape, dtype="uint64", chunks=chunks,
                            axes=ds.spatial_axes(3), scale=ds.voxel_size, labels=True, levels=False)
    seg["0"][...] = labels
    return ds


def rounded(d):
    return {k: (round(v, 4) if isinstance(v, float) else v) for k, v in d.items()}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shape", type=int, nargs=3, default=[48, 384, 384])
    ap.add_argument("--synapses", type=int, default=60, help="synapses in the test volume")
    ap.add_argument("--train-shape", type=int, nargs=3, default=[32, 256, 256])
    ap.add_argument("--train-synapses", type=int, default=24)
    ap.add_argument("--block", type=int, nargs=3, default=[32, 256, 256])
    ap.add_argument("--json", type=Path)
    args = ap.parse_args(argv)
    from workflows.cluster import executor
    from workflows.synapses import run_synapses

    t = time.perf_counter()
    image1, truth1 = make_volume(tuple(args.train_shape), voxel_size=VS, n_synapses=args.train_synapses, seed=1)
    image2, truth2 = make_volume(tuple(args.shape), voxel_size=VS, n_synapses=args.synapses, seed=2)
    print(f"synthetic volumes: {time.perf_counter() - t:.1f} s; test synapses {len(truth2.synapses['size'])}",
          flush=True)
    t = time.perf_counter()
    labels = synapse_training_labels(truth1.synapses, truth1.labels, VS)
    model = train_synapse_model(image1, labels, truth1.labels, VS)
    train_s = time.perf_counter() - t
    print(f"training: {train_s:.1f} s {model.meta}", flush=True)
    n_vox = int(np.prod(args.shape))
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        ds = make_store(Path(tmp) / "bench.zarr", image2, truth2.labels, chunks=(16, 128, 128))
        with executor("threads") as ex:
            t = time.perf_counter()
            rep = run_synapses(ds, config={"block_shape": args.block}, model=model, executor=ex, show_progress=False)
            sec = time.perf_counter() - t
        tab = ds.read_table("em/synapses")
        found = {c: tab.column(c).to_numpy() for c in tab.column_names}
        s = synapse_scores(found, truth2.synapses, VS)
        rows.append({"method": "connectome (pixel + object forests, blockwise)", "seconds": sec,
                     "mvox_per_s": n_vox / sec / 1e6, "blocks": rep["blocks"], **rounded(s)})
        print(rows[-1], flush=True)
    tuned = tune_baseline(image1, truth1)
    t = time.perf_counter()
    pts = dark_blobs(image2, threshold=tuned["threshold"], opening=tuned["opening"])
    sec = time.perf_counter() - t
    s = synapse_scores(centres(pts), truth2.synapses, VS)
    rows.append({"method": "dark blobs (threshold + opening + components, no classifier)", "seconds": sec,
                 "mvox_per_s": n_vox / sec / 1e6, "tuned_on_training_volume": tuned,
                 **{k: round(v, 4) if isinstance(v, float) else v for k, v in s.items()
                    if k in ("found", "true", "matched", "precision", "recall", "f1")}})
    print(rows[-1], flush=True)
    result = {"date": date.today().isoformat(), "machine": f"{platform.node()} ({os.cpu_count()} CPUs, "
              f"{platform.processor() or platform.machine()})", "shape": args.shape, "voxel_size": VS,
              "train_shape": args.train_shape, "train_synapses": len(truth1.synapses["size"]),
              "test_synapses": len(truth2.synapses["size"]), "block_shape": args.block,
              "train_seconds": round(train_s, 1), "match_distance_nm": 300, "rows": rows}
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(result, indent=2) + "\n")
    return result


if __name__ == "__main__":
    main()
