"""Cell detection: connectome side by side with suite2p, on the same movies, in one run.

Movies (both motion-free or already registered, so only detection is compared):

* a synthetic movie with exact ground truth (``make_movie((600, 256, 256),
  motion="none", seed=0)``, 15 Hz, 1 µm pixels, ~12 µm cells): F1, precision
  and recall at IoU >= 0.3 (Hungarian), all cells counted, silent ones included;
* the real Neurofinder crop (600 × 256 × 256, 7.5 Hz), registered by our
  registration stage: only the left half has manual ROIs; a detection whose
  centroid column is < 128 is scored, one that matches an ROI cut by the crop
  edge (``regions_left_border.json``) is neither a true nor a false positive.
  "Active" manual ROIs: skewness of the ROI's ΔF/F (mean over its pixels,
  F0 = 20th percentile) >= 1.

Methods:

* ``connectome`` — the detection stage (``workflows.detection.run_detection``,
  Zarr store → Zarr store, threaded scheduler, one tile), time includes reading
  and binning the movie and writing the outputs;
* ``suite2p`` 1.1 — ``suite2p.detection.detection_wrapper`` (sparsery, its
  default settings, the same diameter, tau = 1 s) on the in-memory float32
  movie, CPU torch, in its own virtual environment (``/tmp/s2p``); its ROIs'
  ``ypix/xpix/lam`` become a label image (largest ``lam`` wins), as ours.

Run::

    python benchmarks/detection.py --json benchmarks/results/detection.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent


# ----------------------------------------------------------------------------- suite2p (child, its own venv)


def _suite2p_child(argv) -> int:
    import _suite2p

    _suite2p.prepare_child_imports()
    import logging

    import torch
    import suite2p
    from suite2p.detection import detection_wrapper
    from suite2p.parameters import default_settings

    logging.disable(logging.INFO)
    p = argparse.ArgumentParser()
    p.add_argument("movie")
    p.add_argument("out")
    p.add_argument("--diameter", type=float)
    p.add_argument("--fs", type=float)
    a = p.parse_args(argv)
    movie = np.load(a.movie).astype(np.float32)
    settings = default_settings()["detection"]
    t0 = time.perf_counter()
    _, stat, _ = detection_wrapper(movie, diameter=[a.diameter, a.diameter], tau=1.0, fs=a.fs, settings=settings,
                                   device=torch.device("cpu"))
    seconds = time.perf_counter() - t0
    np.save(a.out, _suite2p.stat_to_labels(stat, movie.shape[1:]))
    print("RESULT " + json.dumps({"seconds": seconds, "n_rois": len(stat), "suite2p": suite2p.version,
                                  "torch_threads": torch.get_num_threads()}), flush=True)
    return 0


def run_suite2p(python: str, movie, diameter: float, fs: float, tmp: Path) -> tuple[dict, np.ndarray | None]:
    mpath, out = tmp / "movie.npy", tmp / "s2p_labels.npy"
    np.save(mpath, movie.astype(np.float32))
    import _suite2p

    res = _suite2p.run_child(python, __file__, [mpath, out, "--diameter", diameter, "--fs", fs])
    return (res, None) if "error" in res else (res, np.load(out))


# ----------------------------------------------------------------------------- ours and scoring


def run_connectome(ds, config: dict) -> tuple[dict, np.ndarray, np.ndarray]:
    from workflows.cluster import executor
    from workflows.detection import run_detection

    with executor("threads") as ex:
        t0 = time.perf_counter()
        m = run_detection(ds, config=config, executor=ex, overwrite=True, show_progress=False)
        seconds = time.perf_counter() - t0
    rois = ds.read_table("twophoton/rois").to_pandas()
    return {"seconds": seconds, **m}, ds.array("twophoton/rois/labels")[...], rois.source.to_numpy()


def score_synthetic(lab, truth) -> dict:
    from connectome.metrics import match_labels

    r = match_labels(lab, truth.labels, iou_threshold=0.3)
    matched = set((r["pairs"][:, 1] - 1).tolist())
    present = np.bincount(truth.labels.ravel(), minlength=truth.n_cells + 1)[1:] > 0
    return {"f1": r["f1"], "precision": r["precision"], "recall": r["recall"], "n_pred": r["n_pred"],
            "n_true": r["n_true"],
            "recall_active": float(np.mean([k in matched for k in np.flatnonzero(truth.active & present)])),
            "recall_silent": float(np.mean([k in matched for k in np.flatnonzero(~truth.active & present)]))}


def neurofinder_truth(folder: Path, shape, movie):
    from scipy.stats import skew

    left = json.loads((folder / "regions_left.json").read_text())
    border = json.loads((folder / "regions_left_border.json").read_text())
    gt = np.zeros(shape, np.int32)
    for i, r in enumerate(left + border):
        c = np.array(r["coordinates"])
        gt[c[:, 0], c[:, 1]] = i + 1
    active = []
    for i, r in enumerate(left):
        c = np.array(r["coordinates"])
        f = movie[:, c[:, 0], c[:, 1]].astype(np.float64).mean(axis=1)
        f0 = np.percentile(f, 20)
        if skew((f - f0) / f0) >= 1.0:
            active.append(i + 1)
    return gt, len(left), active


def score_neurofinder(lab, gt, n_left, active) -> dict:
    from connectome.metrics import match_labels

    ids = np.unique(lab[lab > 0])
    keep = [i for i in ids if np.mean(np.nonzero(lab == i)[1]) < 128]
    pred = np.where(np.isin(lab, keep), lab, 0)
    r = match_labels(pred, gt, iou_threshold=0.3)
    tp = int(np.sum(r["pairs"][:, 1] <= n_left))
    on_border = int(np.sum(r["pairs"][:, 1] > n_left))
    n_pred = len(keep) - on_border
    p, rc = tp / max(n_pred, 1), tp / n_left
    matched = set(r["pairs"][:, 1].tolist())
    return {"precision": p, "recall": rc, "f1": 2 * p * rc / max(p + rc, 1e-12), "n_pred_left": n_pred,
            "n_true_left": n_left, "recall_active": float(np.mean([k in matched for k in active])),
            "n_active": len(active)}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--suite2p-python", default="/tmp/s2p/bin/python")
    p.add_argument("--shared", type=Path, default=HERE.parent.parent / "shared" / "data")
    p.add_argument("--json", type=Path)
    p.add_argument("--keep", type=Path, help="keep the Neurofinder store here (for docs/detection_figure.py)")
    args = p.parse_args(argv)
    sys.path.insert(0, str(HERE.parent))  # the repository's workflows/, also before a reinstall picks up new modules
    from connectome.io import Dataset
    from connectome.synth.twophoton import make_movie

    results = {"date": time.strftime("%Y-%m-%d"), "machine": {"cpus": os.cpu_count(), "platform": platform.platform(),
                                                              "python": platform.python_version()}, "movies": {}}
    with tempfile.TemporaryDirectory() as tmpd:
        tmp = Path(tmpd)
        # synthetic
        movie, truth = make_movie((600, 256, 256), motion="none", seed=0)
        ds = Dataset.create(tmp / "syn.zarr")
        ds.write_raw(movie, kind="twophoton", scale=(1 / 15, 1, 1), chunks=(100, 256, 256))
        ds.create_output("twophoton/registered", shape=movie.shape, dtype="float32", chunks=(100, 256, 256),
                         stage="x")
        ds.array("twophoton/registered")[...] = movie.astype(np.float32)
        ds.mark_complete("twophoton/registered")
        entry = {}
        m, lab, _ = run_connectome(ds, {"diameter": 12})
        entry["connectome"] = {**m, **score_synthetic(lab, truth)}
        s2p, s2p_lab = run_suite2p(args.suite2p_python, movie, 12.0, 15.0, tmp)
        entry["suite2p"] = s2p if s2p_lab is None else {**s2p, **score_synthetic(s2p_lab, truth)}
        results["movies"]["synthetic 600x256x256 (seed 0)"] = entry
        print(json.dumps(entry, indent=1, default=float), flush=True)
        # neurofinder
        folder = args.shared / "neurofinder-crop"
        if (folder / "movie_crop256_600f.tif").exists():
            from workflows.ingest import ingest
            from workflows.twophoton import run_twophoton

            path = args.keep or tmp / "nf.zarr"
            ds = ingest(str(folder / "movie_crop256_600f.tif"), path, kind="twophoton", frame_rate=7.5,
                        show_progress=False, overwrite=True)
            run_twophoton(ds, ["registration", "summary"], show_progress=False)
            reg = ds.array("twophoton/registered")[...]
            gt, n_left, active = neurofinder_truth(folder, reg.shape[1:], reg)
            entry = {}
            m, lab, _ = run_connectome(ds, {"diameter": 10, "min_energy": 300})
            entry["connectome"] = {**m, **score_neurofinder(lab, gt, n_left, active)}
            s2p, s2p_lab = run_suite2p(args.suite2p_python, reg, 10.0, 7.5, tmp)
            entry["suite2p"] = s2p if s2p_lab is None else {**s2p, **score_neurofinder(s2p_lab, gt, n_left, active)}
            results["movies"]["neurofinder-crop 600x256x256 (real)"] = entry
            print(json.dumps(entry, indent=1, default=float), flush=True)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(results, indent=1, default=float))
    return 0


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "--suite2p-child":
        sys.exit(_suite2p_child(sys.argv[2:]))
    sys.exit(main())
