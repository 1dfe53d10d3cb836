"""The whole two-photon pipeline, connectome side by side with suite2p: same movie, same machine, one run.

Issue #4: wall time, peak memory and accuracy of the full pipeline, from the
input TIFF to traces and spikes, for both tools; goal ``<=`` half suite2p's
time at ``>=`` its F1.

Movies:

* a synthetic movie with exact truth (``connectome.synth.twophoton``,
  default 3000 × 512 × 512, 15 Hz, 1 µm pixels, ``motion="rigid"``, seed 0),
  streamed to a TIFF before anything is timed; scored with F1 / precision /
  recall (IoU >= 0.3, Hungarian, every true cell counted, silent ones
  included), the median Pearson r of a matched ROI's ΔF/F with the true
  calcium (cells with >= 3 spikes) and the median r of its spikes with the
  true spike counts in 0.2 s bins (3 frames);
* the real Neurofinder crop (``../shared/data/neurofinder-crop``, 600 × 256 ×
  256, 7.5 Hz): only ROIs whose centroid column is < 128 are scored against
  the manual ROIs (``regions_left.json``); a detection that matches an ROI cut
  by the crop edge (``regions_left_border.json``) is neither a true nor a false
  positive; scoring is ``benchmarks/detection.py``'s (imported).

Tools, each in fresh processes, its wall time measured from outside (start-up
and imports included):

* ``connectome``: ``connectome ingest MOVIE.tif S.zarr --kind twophoton
  --frame-rate HZ`` then ``connectome twophoton S.zarr --device cpu
  --cluster threads|local --config C.json`` (all six stages: registration,
  summary, detection, extraction, spikes, functional), with only the cell
  diameter set in the config; the total is the sum of the two commands;
* ``suite2p`` 1.1 (its own venv, CPU torch): ``run_s2p`` from the TIFF folder
  with its default settings except ``fs``, ``tau`` = 1 s, ``diameter``,
  the cell size for its default detector (sparsery ``spatial_scale``: 2 for
  10-12 px cells; its own estimate, ``spatial_scale`` = 0, failed on the
  Neurofinder crop: "no ROIs were found"), ``torch_device`` = cpu and
  ``registration.nonrigid`` set to match ours (rigid; with
  ``--suite2p-nonrigid`` also its nonrigid default). Its
  binary conversion, registration, registration metrics, detection,
  extraction, deconvolution and classification are all timed. Its ROIs
  become a label image (largest ``lam`` wins); its ΔF/F for scoring is
  ``(Fc - F0) / F0`` with ``Fc = F - 0.7 Fneu`` and its own
  ``baseline_maximin`` (computed afterwards, not timed).

Peak memory: the largest sum of resident set sizes over the process tree
(sampled every 0.2 s; Dask worker processes included) and the largest single
process's ``VmHWM``. Per-stage seconds come from the store's
``provenance.json`` and suite2p's ``plane_times``. The load average at the
start and end is recorded: the machine may be shared.

Run::

    python benchmarks/twophoton.py --json benchmarks/results/twophoton.json
    python benchmarks/twophoton.py --quick     # 600 × 256 × 256 synthetic + Neurofinder, threads only
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
sys.path.insert(0, str(HERE))  # _suite2p, detection (shared helpers), in either interpreter

import _suite2p  # noqa: E402

SPIKE_BIN_SECONDS = 0.2
NEUROPIL_COEFFICIENT = 0.7  # suite2p's default, and ours


# ----------------------------------------------------------------------------- suite2p (child, its own venv)


def _suite2p_child(argv) -> int:
    """``run``: the timed pipeline. ``post``: label image and ΔF/F from its outputs (not timed)."""
    _suite2p.prepare_child_imports()
    import logging

    p = argparse.ArgumentParser()
    p.add_argument("mode", choices=("run", "post"))
    p.add_argument("data")
    p.add_argument("save")
    p.add_argument("--fs", type=float)
    p.add_argument("--tau", type=float, default=1.0)
    p.add_argument("--diameter", type=float)
    p.add_argument("--nonrigid", type=int, default=0)
    p.add_argument("--spatial-scale", type=int, default=0)
    p.add_argument("--threshold-scaling", type=float, default=1.0)
    a = p.parse_args(argv)
    import torch
    import suite2p

    logging.disable(logging.INFO)
    if a.mode == "run":
        settings = suite2p.default_settings()
        settings.update(fs=a.fs, tau=a.tau, diameter=[a.diameter, a.diameter], torch_device="cpu")
        settings["registration"]["nonrigid"] = bool(a.nonrigid)
        settings["detection"]["sparsery_settings"]["spatial_scale"] = a.spatial_scale
        settings["detection"]["threshold_scaling"] = a.threshold_scaling
        db = {"data_path": [a.data], "save_path0": a.save, "fast_disk": a.save}
        t0 = time.perf_counter()
        suite2p.run_s2p(db=db, settings=settings)
        seconds = time.perf_counter() - t0
        print("RESULT " + json.dumps({"run_s2p_s": seconds, "suite2p": suite2p.version, "torch": torch.__version__,
                                      "torch_threads": torch.get_num_threads()}), flush=True)
        return 0
    from suite2p.extraction import dcnv

    plane = Path(a.save) / "suite2p" / "plane0"
    ops = np.load(plane / "ops.npy", allow_pickle=True).item()
    stat = np.load(plane / "stat.npy", allow_pickle=True)
    F, Fneu = np.load(plane / "F.npy"), np.load(plane / "Fneu.npy")
    iscell = np.load(plane / "iscell.npy")
    labels = _suite2p.stat_to_labels(stat, (int(ops["Ly"]), int(ops["Lx"])))
    Fc = F - NEUROPIL_COEFFICIENT * Fneu
    s = ops["dcnv_preprocess"] if "dcnv_preprocess" in ops else suite2p.default_settings()["dcnv_preprocess"]
    corrected = dcnv.baseline_maximin(Fc.copy(), s["win_baseline"], s["sig_baseline"], a.fs,
                                      device=torch.device("cpu"))
    f0 = Fc - corrected
    with np.errstate(divide="ignore", invalid="ignore"):
        dff = (Fc - f0) / f0
    np.savez(Path(a.save) / "post.npz", labels=labels, dff=dff.astype(np.float32),
             spikes=np.load(plane / "spks.npy").astype(np.float32), accepted=iscell[:, 0].astype(bool))
    times = {k: float(v) for k, v in dict(ops.get("plane_times", {})).items()}
    print("RESULT " + json.dumps({"plane_times": times, "n_rois": int(len(stat)),
                                  "n_iscell": int(iscell[:, 0].sum())}), flush=True)
    return 0


def spatial_scale(diameter: float) -> int:
    """suite2p's sparsery ``spatial_scale`` for a cell diameter: 1 ≈ 6 px, 2 ≈ 12 px, 3 ≈ 24 px, 4 ≈ 48 px."""
    return int(np.clip(round(np.log2(diameter / 3.0)), 1, 4))


def run_suite2p(python: str, tif: Path, work: Path, *, fs: float, diameter: float, nonrigid: bool,
                scale: int, threshold_scaling: float = 1.0, tau: float = 1.0,
                timeout: float | None = None) -> tuple[dict, dict | None]:
    data = work / "data"
    data.mkdir(parents=True)
    os.symlink(tif, data / tif.name)  # the folder suite2p scans holds only this movie
    save = work / "save"
    common = [str(data), str(save), "--fs", str(fs), "--tau", str(tau), "--diameter", str(diameter),
              "--nonrigid", str(int(nonrigid)), "--spatial-scale", str(scale),
              "--threshold-scaling", str(threshold_scaling)]
    me = str(Path(__file__).resolve())
    m = _suite2p.measure([python, me, "--suite2p-child", "run"] + common, env=_suite2p.child_env(),
                         cwd=tempfile.gettempdir(), log=work / "run.log", timeout=timeout)
    log = (work / "run.log").read_text(errors="replace")
    res = _suite2p.parse_result(log, log, m["returncode"])
    if "error" in res:
        return {**m, **res}, None
    post = subprocess.run([python, me, "--suite2p-child", "post"] + common, capture_output=True, text=True,
                          env=_suite2p.child_env(), cwd=tempfile.gettempdir())
    pres = _suite2p.parse_result(post.stdout, post.stderr, post.returncode)
    if "error" in pres:
        return {**m, **res, **pres}, None
    with np.load(save / "post.npz") as z:
        arrays = {k: z[k] for k in z.files}
    pt = pres["plane_times"]
    return {**m, **res, "n_rois": pres["n_rois"], "n_accepted": pres["n_iscell"],
            "stage_s": {k: round(v, 2) for k, v in pt.items()}}, arrays


# ----------------------------------------------------------------------------- connectome (fresh processes)


def connectome_command() -> list[str]:
    exe = shutil.which("connectome", path=os.path.dirname(sys.executable)) or shutil.which("connectome")
    if exe:
        return [exe]
    return [sys.executable, "-c", "import sys; from connectome.cli import main; sys.exit(main())"]


def run_connectome(tif: Path, work: Path, *, fs: float, diameter: float, cluster: str,
                   timeout: float | None = None) -> tuple[dict, dict | None]:
    from connectome.io import Dataset

    work.mkdir(parents=True)
    store = work / "movie.zarr"
    cfg = work / "config.json"
    cfg.write_text(json.dumps({"detection": {"diameter": diameter}}))
    cli = connectome_command()
    env = dict(os.environ)
    steps = {}
    steps["ingest"] = _suite2p.measure(cli + ["ingest", str(tif), str(store), "--kind", "twophoton",
                                              "--frame-rate", str(fs)], env=env, cwd=str(work),
                                       log=work / "ingest.log", timeout=timeout)
    if steps["ingest"]["returncode"] != 0:
        return {"error": "ingest: " + _tail(work / "ingest.log"), "steps": steps}, None
    steps["twophoton"] = _suite2p.measure(cli + ["twophoton", str(store), "--device", "cpu", "--cluster", cluster,
                                                 "--config", str(cfg)], env=env, cwd=str(work),
                                          log=work / "twophoton.log", timeout=timeout)
    if steps["twophoton"]["returncode"] != 0:
        return {"error": "twophoton: " + _tail(work / "twophoton.log"), "steps": steps}, None
    ds = Dataset(store)
    rois = ds.read_table("twophoton/rois").to_pandas()
    stages = ds.provenance.stages()
    stage_s = {k.replace("twophoton.", ""): v.get("seconds") for k, v in stages.items()
               if "seconds" in v and k.count(".") <= 1}
    arrays = {"labels": np.asarray(ds.array("twophoton/rois/labels")[...]),
              "dff": np.asarray(ds.array("twophoton/traces/dff")[...]),
              "spikes": np.asarray(ds.array("twophoton/traces/spikes")[...]),
              "accepted": np.zeros(0, bool)}
    acc = np.zeros(len(arrays["dff"]), bool)
    acc[rois.roi_id.to_numpy() - 1] = rois.accepted.to_numpy(bool)
    arrays["accepted"] = acc
    total = {k: round(sum(s[k] for s in steps.values()), 3) for k in ("wall_s", "cpu_s")}
    peaks = {k: max(s[k] for s in steps.values()) for k in ("peak_tree_rss_mb", "max_process_hwm_mb")}
    return {**total, **peaks, "n_rois": int(len(rois)), "n_accepted": int(rois.accepted.sum()),
            "stage_s": stage_s, "steps": steps,
            "stage_metrics": {k.replace("twophoton.", ""): v.get("metrics") for k, v in stages.items()
                              if k in ("twophoton.registration", "twophoton.detection")}}, arrays


def _tail(path: Path, n: int = 3) -> str:
    return " | ".join(path.read_text(errors="replace").strip().splitlines()[-n:])


# ----------------------------------------------------------------------------- scoring


def keep_only(labels, keep) -> np.ndarray:
    """Label image with the ROIs where ``keep[id - 1]`` is False set to 0."""
    lut = np.concatenate([[False], np.asarray(keep, bool)])
    return np.where(lut[np.clip(labels, 0, len(lut) - 1)], labels, 0)


def score_synthetic_run(arrays, truth) -> dict:
    from connectome.metrics import binned_correlation, match_labels
    from detection import score_synthetic

    out = {}
    for name, lab in (("all", arrays["labels"]), ("accepted", keep_only(arrays["labels"], arrays["accepted"]))):
        s = score_synthetic(lab, truth)
        out[name] = {k: (round(v, 4) if isinstance(v, float) else v) for k, v in s.items()}
    pairs = match_labels(arrays["labels"], truth.labels, iou_threshold=0.3)["pairs"]
    pairs = [(int(p) - 1, int(t) - 1) for p, t in pairs if truth.active[int(t) - 1]]
    if pairs:
        pi, ti = np.array(pairs).T
        dff = arrays["dff"][pi].astype(np.float64)
        r = np.array([np.corrcoef(d, c)[0, 1] if np.all(np.isfinite(d)) and d.std() > 0 else np.nan
                      for d, c in zip(dff, truth.calcium[ti])])
        rs = binned_correlation(np.nan_to_num(arrays["spikes"][pi]), truth.spikes[ti], truth.frame_rate,
                                bin_seconds=SPIKE_BIN_SECONDS)
        out["traces"] = {"n_matched_active": len(pairs), "median_r_dff_calcium": round(float(np.nanmedian(r)), 4),
                         "median_r_spikes": round(float(np.nanmedian(rs)), 4),
                         "spike_bin_s": SPIKE_BIN_SECONDS}
    return out


def score_neurofinder_run(arrays, gt, n_left, active) -> dict:
    from detection import score_neurofinder

    out = {}
    for name, lab in (("all", arrays["labels"]), ("accepted", keep_only(arrays["labels"], arrays["accepted"]))):
        s = score_neurofinder(lab, gt, n_left, active)
        out[name] = {k: (round(v, 4) if isinstance(v, float) else v) for k, v in s.items()}
    return out


# ----------------------------------------------------------------------------- driver


def write_synthetic_tiff(path: Path, shape, seed: int):
    """Stream the synthetic movie to a TIFF (one page per frame); returns its truth."""
    import tifffile

    from connectome.synth.twophoton import iter_movie

    truth, chunks = iter_movie(shape, motion="rigid", seed=seed, time_chunk=100)

    def frames():
        for _, block in chunks:
            yield from block

    tifffile.imwrite(path, frames(), shape=shape, dtype=np.uint16, photometric="minisblack")
    return truth


def run_movie(name, tif, work, *, fs, diameter, clusters, args, scorer) -> dict:
    entry = {"tools": {}}
    jobs = [(f"connectome ({c})", "connectome", c) for c in clusters]
    jobs.append(("suite2p (rigid, as ours)", "suite2p", (False, 1.0)))
    if args.suite2p_nonrigid:
        jobs.append(("suite2p (nonrigid, its default)", "suite2p", (True, 1.0)))
    if args.suite2p_threshold_scaling is not None:
        jobs.append((f"suite2p (rigid, threshold_scaling {args.suite2p_threshold_scaling})", "suite2p",
                     (False, args.suite2p_threshold_scaling)))
    for label, tool, opt in jobs:
        sub = work / label.split()[0] / ("_".join(map(str, opt)) if tool == "suite2p" else opt)
        load = os.getloadavg()
        if tool == "connectome":
            res, arrays = run_connectome(tif, sub, fs=fs, diameter=diameter, cluster=opt, timeout=args.timeout)
        else:
            if not Path(args.suite2p_python).exists():
                entry["tools"][label] = {"error": f"{args.suite2p_python} not found"}
                continue
            scale = spatial_scale(diameter) if args.suite2p_spatial_scale < 0 else args.suite2p_spatial_scale
            res, arrays = run_suite2p(args.suite2p_python, tif, sub, fs=fs, diameter=diameter, nonrigid=opt[0],
                                      scale=scale, threshold_scaling=opt[1], timeout=args.timeout)
            res["threshold_scaling"] = opt[1]
            res["spatial_scale"] = scale
        res["loadavg_before"] = [round(v, 2) for v in load]
        if arrays is not None:
            res["score"] = scorer(arrays)
        entry["tools"][label] = res
        print(f"[{name}] {label}: " + json.dumps({k: v for k, v in res.items() if k != "steps"}, default=float),
              flush=True)
        shutil.rmtree(sub, ignore_errors=True)
    ref = entry["tools"].get("suite2p (rigid, as ours)", {})
    if "wall_s" in ref and "error" not in ref:  # no ratio against a failed run
        entry["ratio_wall_vs_suite2p_rigid"] = {k: round(v["wall_s"] / ref["wall_s"], 3)
                                                for k, v in entry["tools"].items() if "wall_s" in v}
        entry["ratio_cpu_vs_suite2p_rigid"] = {k: round(v["cpu_s"] / ref["cpu_s"], 3)
                                               for k, v in entry["tools"].items() if "cpu_s" in v}
    return entry


def table(results) -> str:
    rows = ["| movie | tool | wall s | wall ratio | CPU s | CPU ratio | peak tree RSS MB | F1 | P | R | F1 accepted "
            "| r ΔF/F | r spikes |",
            "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for movie, entry in results["movies"].items():
        for tool, r in entry["tools"].items():
            if "error" in r:
                rows.append(f"| {movie} | {tool} | error: {r['error'][:80]} ||||||||||||")
                continue
            s = r.get("score", {})
            a, acc, tr = s.get("all", {}), s.get("accepted", {}), s.get("traces", {})
            ratio = entry.get("ratio_wall_vs_suite2p_rigid", {}).get(tool, float("nan"))
            cratio = entry.get("ratio_cpu_vs_suite2p_rigid", {}).get(tool, float("nan"))
            rows.append(f"| {movie} | {tool} | {r['wall_s']:.1f} | {ratio:.2f} | {r['cpu_s']:.0f} | {cratio:.2f} | "
                        f"{r['peak_tree_rss_mb']:.0f} | {a.get('f1', float('nan')):.3f} | "
                        f"{a.get('precision', float('nan')):.3f} | {a.get('recall', float('nan')):.3f} | "
                        f"{acc.get('f1', float('nan')):.3f} | {tr.get('median_r_dff_calcium', float('nan')):.3f} | "
                        f"{tr.get('median_r_spikes', float('nan')):.3f} |")
    return "\n".join(rows)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--frames", type=int, default=3000)
    p.add_argument("--size", type=int, default=512)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--clusters", default="threads,local", help="connectome --cluster values to time")
    p.add_argument("--suite2p-python", default=_suite2p.DEFAULT_PYTHON)
    p.add_argument("--suite2p-nonrigid", action="store_true", help="also time suite2p's nonrigid default")
    p.add_argument("--suite2p-spatial-scale", type=int, default=-1,
                   help="sparsery spatial_scale; -1: from the diameter (default), 0: suite2p's own estimate")
    p.add_argument("--suite2p-threshold-scaling", type=float,
                   help="also time suite2p (rigid) with this detection threshold_scaling (its default: 1.0)")
    p.add_argument("--update", action="store_true",
                   help="keep the other movies already in --json; replace those run now")
    p.add_argument("--shared", type=Path, default=REPO.parent / "shared" / "data")
    p.add_argument("--no-synthetic", action="store_true")
    p.add_argument("--no-neurofinder", action="store_true")
    p.add_argument("--timeout", type=float, default=3600.0, help="seconds per timed command")
    p.add_argument("--workdir", type=Path, help="scratch folder (default: a temporary one)")
    p.add_argument("--json", type=Path)
    p.add_argument("--quick", action="store_true", help="600 x 256 x 256 synthetic, threads only")
    a = p.parse_args(argv)
    if a.quick:
        a.frames, a.size, a.clusters = 600, 256, "threads"
    clusters = [c for c in a.clusters.split(",") if c]
    import scipy

    import connectome

    results = {"info": {"date": time.strftime("%Y-%m-%d"), "cpu_count": os.cpu_count(),
                        "platform": platform.platform(), "python": platform.python_version(),
                        "numpy": np.__version__, "scipy": scipy.__version__,
                        "connectome": getattr(connectome, "__version__", "?"),
                        "mem_total_gb": round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30, 1),
                        "loadavg_start": [round(v, 2) for v in os.getloadavg()],
                        "command": " ".join(["python benchmarks/twophoton.py"]
                                            + (argv if argv is not None else sys.argv[1:]))},
               "movies": {}}
    with tempfile.TemporaryDirectory(dir=a.workdir) as td:
        tmp = Path(td)
        if not a.no_synthetic:
            shape = (a.frames, a.size, a.size)
            t0 = time.perf_counter()
            tif = tmp / "synthetic" / "movie.tif"
            tif.parent.mkdir()
            truth = write_synthetic_tiff(tif, shape, a.seed)
            name = f"synthetic {shape[0]}x{shape[1]}x{shape[2]} rigid (seed {a.seed})"
            print(f"{name}: {truth.n_cells} cells ({int(truth.active.sum())} with >= 3 spikes), TIFF written in "
                  f"{time.perf_counter() - t0:.0f} s", flush=True)
            entry = run_movie(name, tif, tmp / "syn", fs=truth.frame_rate, diameter=12.0, clusters=clusters, args=a,
                              scorer=lambda arr: score_synthetic_run(arr, truth))
            entry["movie"] = {"shape": list(shape), "frame_rate": truth.frame_rate, "n_cells": truth.n_cells,
                              "n_active": int(truth.active.sum()), "diameter_px": 12.0, "motion": "rigid"}
            results["movies"][name] = entry
            tif.unlink()
        folder = a.shared / "neurofinder-crop"
        if not a.no_neurofinder and (folder / "movie_crop256_600f.tif").exists():
            import tifffile

            from detection import neurofinder_truth

            tif = folder / "movie_crop256_600f.tif"
            movie = tifffile.imread(tif)
            gt, n_left, active = neurofinder_truth(folder, movie.shape[1:], movie)
            del movie
            name = "neurofinder-crop 600x256x256 (real, left half scored)"
            entry = run_movie(name, tif, tmp / "nf", fs=7.5, diameter=10.0, clusters=clusters, args=a,
                              scorer=lambda arr: score_neurofinder_run(arr, gt, n_left, active))
            entry["movie"] = {"shape": [600, 256, 256], "frame_rate": 7.5, "n_true_left": n_left,
                              "n_active_left": len(active), "diameter_px": 10.0}
            results["movies"][name] = entry
    results["info"]["loadavg_end"] = [round(v, 2) for v in os.getloadavg()]
    results["table"] = table(results)
    print(results["table"])
    if a.json and a.update and a.json.exists():
        old = json.loads(a.json.read_text())
        runs = old.get("runs", [old["info"]]) + [results["info"]]
        results = {"runs": runs, "info": results["info"], "movies": {**old["movies"], **results["movies"]}}
        results["table"] = table(results)
    if a.json:
        a.json.parent.mkdir(parents=True, exist_ok=True)
        a.json.write_text(json.dumps(results, indent=1, default=float) + "\n")
    return 0


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "--suite2p-child":
        sys.exit(_suite2p_child(sys.argv[2:]))
    sys.path.insert(0, str(REPO))
    sys.exit(main())
