"""``connectome demo``: synthetic data with ground truth, every stage, a score table.

Makes a two-photon movie and an EM volume with exact ground truth
(:mod:`connectome.synth`), writes them as dataset stores
(``OUT/twophoton.zarr``, ``OUT/em.zarr``) with the truth beside them, never
inside (``OUT/*.truth.npz``), runs every pipeline stage that exists, and
prints accuracy against the truth. Baseline rows (naive methods run
blockwise by the same runner) show what the pipeline stages must beat.

Re-running with the same ``--out``, size and seed reuses the stores.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from connectome.errors import InputError
from connectome.io import Dataset, axes_for, create_multiscale
from workflows.cluster import check_cluster, executor
from workflows.labels import label_blockwise
from workflows.progress import progress
from workflows.pyramid import build_pyramid

SIZES = {
    "small": {
        "twophoton": {"shape": (600, 256, 256), "frame_rate": 15.0, "motion": "rigid"},
        "em": {"shape": (48, 256, 256), "voxel_size": (40, 8, 8)},
    },
    "medium": {
        "twophoton": {"shape": (2000, 512, 512), "frame_rate": 15.0, "motion": "nonrigid"},
        "em": {"shape": (96, 512, 512), "voxel_size": (40, 8, 8)},
    },
}


@dataclass
class Row:
    dataset: str
    stage: str
    metric: str
    value: float | str
    note: str = ""


@dataclass
class DemoResult:
    out: Path
    rows: list[Row] = field(default_factory=list)
    seconds: dict = field(default_factory=dict)

    def add(self, *args, **kw):
        self.rows.append(Row(*args, **kw))


def _same_recipe(ds_path: Path, recipe: dict) -> bool:
    if not ds_path.exists():
        return False
    try:
        ds = Dataset(ds_path, mode="r")
        return ds.root.attrs.get("connectome", {}).get("synthetic") == recipe and ds.is_complete("raw")
    except Exception:
        return False


def make_twophoton(out: Path, size: str, seed: int):
    """Write the synthetic movie as ``out/twophoton.zarr`` (streamed) and its truth."""
    from connectome.synth.twophoton import iter_movie, load_truth, save_truth

    params = SIZES[size]["twophoton"]
    recipe = {"kind": "twophoton", "seed": seed, **{k: list(v) if isinstance(v, tuple) else v for k, v in params.items()}}
    path, truth_path = out / "twophoton.zarr", out / "twophoton.truth.npz"
    if _same_recipe(path, recipe) and truth_path.exists():
        return Dataset(path), load_truth(truth_path)
    shape = params["shape"]
    truth, frames = iter_movie(shape, time_chunk=100, frame_rate=params["frame_rate"], motion=params["motion"],
                               seed=seed)
    ds = Dataset.create(path, overwrite=True)
    chunks = (100,) + tuple(shape[1:])
    group = create_multiscale(ds.root, "raw", shape=shape, dtype=np.uint16, chunks=chunks,
                              axes=axes_for("twophoton", len(shape)),
                              scale=(1.0 / params["frame_rate"],) + tuple(truth.voxel_size))
    ds.mark_complete("raw", False)  # a killed demo never leaves a movie that looks whole
    with progress("synthetic two-photon movie", shape[0]) as advance:
        for t0, block in frames:
            group["0"][t0 : t0 + len(block)] = block
            advance(len(block))
    build_pyramid(group)
    save_truth(truth, truth_path)
    ds.root.attrs["connectome"] = {"kind": "twophoton", "synthetic": recipe}
    ds.mark_complete("raw", True)
    return ds, truth


def make_em(out: Path, size: str, seed: int):
    """Write the synthetic EM volume as ``out/em.zarr`` and its truth."""
    from connectome.synth.em import load_truth, make_volume, save_truth

    params = SIZES[size]["em"]
    recipe = {"kind": "em", "seed": seed, **{k: list(v) for k, v in params.items()}}
    path, truth_path = out / "em.zarr", out / "em.truth.npz"
    if _same_recipe(path, recipe) and truth_path.exists():
        return Dataset(path), load_truth(truth_path)
    with progress("synthetic EM volume", 1) as advance:
        image, truth = make_volume(params["shape"], voxel_size=params["voxel_size"], seed=seed)
        advance()
    ds = Dataset.create(path, overwrite=True)
    ds.write_raw(image, kind="em", scale=params["voxel_size"], chunks=(16, 128, 128))
    save_truth(truth, truth_path)
    ds.root.attrs["connectome"] = {"kind": "em", "synthetic": recipe}
    return ds, truth


def em_threshold_baseline(ds: Dataset, truth, ex, result: DemoResult) -> None:
    """Naive segmentation: Otsu threshold of the raw image + blockwise connected components."""
    from skimage.filters import threshold_otsu

    from connectome.metrics import adapted_rand_error, variation_of_information

    t0 = time.perf_counter()
    level = ds.raw_info.paths[min(1, len(ds.raw_info.paths) - 1)]
    threshold = float(threshold_otsu(ds.array("raw", level)[...]))
    n = label_blockwise(ds, "raw", "baselines/threshold_cc", block_shape=(16, 128, 128), threshold=threshold,
                        executor=ex, stage="baseline.threshold_cc")
    seg = ds.array("baselines/threshold_cc")[...]
    split, merge = variation_of_information(seg, truth.labels, ignore_gt=())
    are = adapted_rand_error(seg, truth.labels, ignore_gt=())
    note = f"{n} objects vs {len(np.unique(truth.labels))} neurons"
    result.add("em", "baseline: threshold + connected components", "VI split / merge (bits)",
               f"{split:.2f} / {merge:.2f}", note)
    result.add("em", "baseline: threshold + connected components", "adapted Rand error", f"{are:.3f}")
    result.seconds["em baseline"] = time.perf_counter() - t0


def twophoton_mean_baseline(ds: Dataset, truth, result: DemoResult) -> None:
    """Naive detection: Otsu threshold of the unregistered mean image + connected components."""
    import scipy.ndimage as ndi
    from skimage.filters import threshold_otsu

    from connectome.metrics import match_labels

    t0 = time.perf_counter()
    raw = ds.raw()
    total = np.zeros(raw.shape[1:], np.float64)
    for start in range(0, raw.shape[0], raw.chunks[0]):
        total += raw[start : start + raw.chunks[0]].sum(axis=0, dtype=np.float64)
    mean = total / raw.shape[0]
    labels, _ = ndi.label(mean > threshold_otsu(mean))
    m = match_labels(labels, truth.labels, iou_threshold=0.3)
    rms = float(np.sqrt(np.mean(np.sum(truth.shifts.astype(np.float64) ** 2, axis=1))))
    result.add("twophoton", "data", "cells / active / true motion RMS",
               f"{truth.labels.max()} / {int(truth.active.sum())} / {rms:.2f} px")
    result.add("twophoton", "baseline: Otsu on raw mean image", "ROI F1 (IoU ≥ 0.3)", f"{m['f1']:.2f}",
               f"precision {m['precision']:.2f}, recall {m['recall']:.2f}")
    result.seconds["twophoton baseline"] = time.perf_counter() - t0


def twophoton_stages(ds: Dataset, truth, ex, device: str, result: DemoResult) -> None:
    """Registration and summary images, scored against the true motion."""
    from workflows.twophoton import run_twophoton

    t0 = time.perf_counter()
    out = run_twophoton(ds, ["registration", "summary"], executor=ex, device=device)
    m = out["registration"]
    shifts = ds.array("twophoton/shifts")[...].astype(np.float64)
    offset = np.median(shifts - truth.shifts, axis=0)  # the estimated reference sits at an arbitrary position
    err = np.sqrt(np.mean(np.sum((shifts - offset - truth.shifts) ** 2, axis=1)))
    result.add("twophoton", "registration (rigid)", "shift RMSE vs truth (px)", f"{err:.3f}",
               f"true motion RMS {np.sqrt(np.mean(np.sum(truth.shifts.astype(np.float64) ** 2, axis=1))):.2f} px")
    result.add("twophoton", "registration (rigid)", "frame–reference r before → after",
               f"{m['corr_before_mean']:.3f} → {m['corr_after_mean']:.3f}",
               f"crispness {m['crispness_before']:.2f} → {m['crispness_after']:.2f}")
    result.seconds["twophoton registration + summary"] = time.perf_counter() - t0


def twophoton_cell_rows(ds: Dataset, truth, ex, device: str, result: DemoResult) -> None:
    """Detection, extraction, spikes and functional connectivity, scored against the truth."""
    from connectome.metrics import binned_correlation, match_labels
    from workflows.twophoton import run_twophoton

    t0 = time.perf_counter()
    out = run_twophoton(ds, ["detection", "extraction", "spikes", "functional"], executor=ex, device=device)
    labels = ds.array("twophoton/rois/labels")[...]
    rois = ds.read_table("twophoton/rois").to_pydict()
    m = match_labels(labels, truth.labels, iou_threshold=0.3)
    sources = rois.get("source", [])
    n_act, n_anat = sum(s == "activity" for s in sources), sum(s == "anatomical" for s in sources)
    result.add("twophoton", "detection (tiles, activity + anatomical)", "ROI F1 (IoU ≥ 0.3)", f"{m['f1']:.2f}",
               f"precision {m['precision']:.2f}, recall {m['recall']:.2f}; {n_act} activity + {n_anat} anatomical")
    # matched pairs: our ROI id -> true cell index
    pairs = [(int(a), int(b)) for a, b in m["pairs"]]
    dff = ds.array("twophoton/traces/dff")
    spikes = ds.array("twophoton/traces/spikes")
    r_dff, r_spk = [], []
    for ours, true in pairs:
        d = np.asarray(dff[ours - 1], np.float64)
        c = truth.calcium[true - 1]
        r_dff.append(float(np.corrcoef(d, c)[0, 1]) if d.std() > 0 and c.std() > 0 else float("nan"))
        if truth.active[true - 1]:
            r_spk.append(float(binned_correlation(np.asarray(spikes[ours - 1]), truth.spikes[true - 1],
                                                  truth.frame_rate, bin_seconds=0.04)[0]))
    acc = np.asarray(rois.get("accepted", []), bool)
    result.add("twophoton", "extraction (neuropil-corrected ΔF/F)", "median r(ΔF/F, true calcium)",
               f"{np.nanmedian(r_dff):.3f}" if np.isfinite(r_dff).any() else "–",
               f"{int(np.isfinite(r_dff).sum())} matched cells with calcium; {int(acc.sum())}/{len(acc)} ROIs accepted")
    result.add("twophoton", "spikes (OASIS AR(2))", "median spike r (40 ms bins)",
               f"{np.median(r_spk):.3f}" if r_spk else "–", f"{len(r_spk)} matched active cells")
    edges = ds.read_table("graph/functional_edges").to_pydict()
    # map our ROI ids to ensembles through the matching; unmatched ROIs belong to none
    ens = {ours: int(truth.ensemble[true - 1]) for ours, true in pairs}
    found = {(a, b) for a, b in zip(edges["roi_a"], edges["roi_b"])}
    judged = {(a, b) for a, b in found if a in ens and b in ens}  # edges of false ROIs have no truth
    same = {(a, b) for a in ens for b in ens if a < b and ens[a] >= 0 and ens[a] == ens[b]}
    tp = len(judged & same)
    result.add("twophoton", "functional (spikes, shift surrogates)", "ensemble pairs precision / recall",
               f"{tp / max(len(judged), 1):.2f} / {tp / max(len(same), 1):.2f}",
               f"{len(found)} edges ({len(judged)} between matched ROIs), {len(same)} true same-ensemble pairs")
    result.seconds["twophoton cells → functional"] = time.perf_counter() - t0
    return out


def run_demo(out, *, size: str = "small", device: str = "cpu", cluster: str = "local", seed: int = 0,
             print_table: bool = True) -> DemoResult:
    """Make the demo data, run every stage that exists, and report accuracy."""
    if size not in SIZES:
        raise InputError(f"unknown demo size {size!r}: expected one of {', '.join(SIZES)}")
    check_cluster(cluster)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    result = DemoResult(out)
    t0 = time.perf_counter()
    tp, tp_truth = make_twophoton(out, size, seed)
    em, em_truth = make_em(out, size, seed)
    result.seconds["synthetic data"] = time.perf_counter() - t0
    with executor(cluster) as ex:
        if ex.dashboard_link:
            print(f"Dask dashboard: {ex.dashboard_link}")
        twophoton_mean_baseline(tp, tp_truth, result)
        twophoton_stages(tp, tp_truth, ex, device, result)
        twophoton_cell_rows(tp, tp_truth, ex, device, result)
        em_threshold_baseline(em, em_truth, ex, result)
        from workflows.em import em_demo_rows

        em_demo_rows(em, em_truth, ex, result)
        n_syn = len(em_truth.synapses["synapse_id"])
        result.add("em", "data", "neurons / synapses / voxel (nm)",
                   f"{len(np.unique(em_truth.labels))} / {n_syn} / {tuple(em.voxel_size)}")
    result.seconds["total"] = time.perf_counter() - t0
    if print_table:
        print_results(result, device=device, cluster=cluster)
    return result


def print_results(result: DemoResult, *, device: str, cluster: str) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"connectome demo — accuracy against ground truth ({result.out})")
    for c in ("dataset", "stage", "metric", "value", "note"):
        table.add_column(c)
    for r in result.rows:
        table.add_row(r.dataset, r.stage, r.metric, str(r.value), r.note)
    con = Console()
    if not con.is_terminal:  # logs and pipes: wide enough that cells do not wrap
        con = Console(width=140)
    con.print(table)
    times = ", ".join(f"{k} {v:.1f} s" for k, v in result.seconds.items())
    con.print(f"device {device}, cluster {cluster}; {times}")
    con.print("Baseline rows are naive methods the pipeline stages must beat; stages add rows as they land.")
