"""The ``synapses`` stage of ``connectome em``: detect synapses blockwise, or import them.

``em.synapses`` (detection) → ``em/synapses.parquet``
    One task per block of ``raw/0``: the block is read with the model's halo
    (:meth:`connectome.em.SynapseModel.halo`) together with the same region
    of ``em/segmentation``, and :func:`connectome.em.detect_synapses` keeps
    the synapses whose cleft centroid lies in the block's core, so each
    synapse is found by exactly one block, as it would be in the whole
    volume. Each finished block saves its rows in ``_scratch_synapses/``
    (written atomically, then counted as done): an interrupted run resumes
    with the blocks it has not saved. The table is written once, whole and
    atomically, when every block is done; ``synapse_id`` numbers the rows
    in (z, y, x) order of their centres, so the table does not depend on the
    block shape. ``pre_id`` / ``post_id`` are the segments at the pre / post
    points (the points are placed inside the two segments the cleft
    separates).
``graph.synapses`` (import, ``--synapses TABLE``)
    :func:`workflows.graph.import_synapses`: the lab's own detections.

Then :func:`workflows.graph.run_graph` makes ``graph/neurons.parquet`` and
``graph/edges.parquet``.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import time
from dataclasses import dataclass, field, fields
from pathlib import Path

import dask
import numpy as np
import pyarrow as pa

from connectome.backend import resolve_device, to_device
from connectome.em._synapses import (
    DetectionParams,
    SynapseModel,
    detect_synapses,
    load_synapse_model,
    merge_duplicates,
    synapse_feature_spec,
    synapse_halo,
    train_synapse_model,
    valid_region,
)
from connectome.errors import InputError, StageError, StoreError
from connectome.graph import _store as st
from connectome.graph._points import SYNAPSE_COLUMNS
from connectome.io import Dataset
from connectome.io.store import read_array
from workflows.blockwise import Block, block_grid
from workflows.cluster import Executor
from workflows.progress import progress

STAGE = "em.synapses"
SEGMENTATION = "em/segmentation"
SCRATCH = "_scratch_synapses"


@dataclass
class SynapsesConfig:
    """``[synapses]`` of the config file.

    ``model`` is a synapse model file (``connectome em-train --target
    synapses``); ``block_shape`` the blocks of detection (z, y, x); any
    field of :class:`connectome.em.DetectionParams` (``threshold``,
    ``min_size``, ``score_threshold``, ``merge_distance`` …) overrides the
    model's.
    """

    model: str | None = None
    block_shape: tuple = (32, 256, 256)
    detection: dict = field(default_factory=dict)

    @classmethod
    def from_dict(cls, d: dict | None) -> "SynapsesConfig":
        d = dict(d or {})
        known = {f.name for f in fields(cls)} - {"detection"}
        params = {f.name for f in fields(DetectionParams)}
        unknown = set(d) - known - params
        if unknown:
            raise InputError(f"unknown [synapses] setting(s): {', '.join(sorted(unknown))}; "
                             f"known: {', '.join(sorted(known | params))}")
        block = tuple(int(b) for b in d.get("block_shape", cls.block_shape))
        if len(block) != 3 or any(b <= 0 for b in block):
            raise InputError(f"[synapses] block_shape must be 3 positive sizes (z, y, x), got {block}")
        detection = {k: v for k, v in d.items() if k in params}
        return cls(model=d.get("model"), block_shape=block, detection=detection)


def _plain(obj):
    return json.loads(json.dumps(obj, default=str))


def _signature(obj) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:16]


def check_segmentation(ds: Dataset, name: str = SEGMENTATION):
    """The complete segmentation the synapses' partners come from, or a one-line error."""
    from workflows.graph import _segmentation

    return _segmentation(ds, name, ": synapse partners are looked up in it")


def _raw_em(ds: Dataset):
    if ds.kind != "em":
        raise InputError(f"{ds.path}: raw is a two-photon movie, not an EM volume")
    raw = ds.raw()
    if raw.ndim != 3:
        raise InputError(f"{ds.path}: EM raw must be 3-D (z, y, x), got shape {raw.shape}")
    return raw


def _model(model) -> SynapseModel:
    if isinstance(model, SynapseModel):
        return model
    if model is None:
        raise StageError("the synapses stage needs a synapse model ([synapses] model = PATH in --config, trained by "
                         "`connectome em-train --target synapses`) or detections to import (--synapses TABLE)")
    return load_synapse_model(model)


def _model_digest(model: SynapseModel) -> str:
    h = hashlib.sha256()
    for k in ("left", "right", "feature", "threshold", "value", "roots"):
        h.update(np.ascontiguousarray(getattr(model.pixel, k)).tobytes())
    if model.objects is not None:
        for k in sorted(model.objects):
            h.update(np.ascontiguousarray(model.objects[k]).tobytes())
    h.update(model.spec.to_json().encode())
    return h.hexdigest()[:16]


def _mtime(ds: Dataset, arr) -> int | None:
    p = ds.path / arr.path / "zarr.json"
    return p.stat().st_mtime_ns if p.exists() else None


# ---------------------------------------------------------------- the block task
def _synapse_block(store: str, raw_path: str, seg_path: str, block: Block, shape, model: SynapseModel,
                   params: DetectionParams, voxel_size, out: str, device: str) -> int:
    import zarr

    root = zarr.open_group(store, mode="r")
    image = read_array(root[raw_path], block.outer, raw_path)
    seg = read_array(root[seg_path], block.outer, seg_path)
    if device == "gpu":
        image = to_device(image, "gpu")
    found = detect_synapses(image, seg, model, voxel_size, inner=block.inner,
                            valid=valid_region(block.outer, shape, model.spec), params=params)
    origin = np.array([s.start for s in block.outer], np.int64)
    rows = {k: (v + origin if k in ("center", "pre", "post") else v) for k, v in found.items()}
    rows["centroid"] = found["centroid"] + origin
    tmp = f"{out}.tmp-{os.getpid()}.npz"
    np.savez(tmp, **rows)
    os.replace(tmp, out)
    return int(len(found["size"]))


def _merge(parts: list[dict]) -> dict:
    keys = ("center", "centroid", "pre", "post", "pre_id", "post_id", "size", "score")
    return {k: np.concatenate([p[k] for p in parts]) for k in keys}


def synapse_table(found: dict) -> pa.Table:
    """Detections (dict of arrays from :func:`connectome.em.detect_synapses`) as the ``em/synapses`` table."""
    n = len(found["size"])
    cols = {"synapse_id": pa.array(np.arange(1, n + 1, dtype=np.int64))}
    for side in ("pre", "post"):
        pts = np.asarray(found[side], np.float64).reshape(n, 3)
        for k, a in enumerate("zyx"):
            cols[f"{side}_{a}"] = pa.array(pts[:, k])
    cols["size"] = pa.array(np.asarray(found["size"], np.int64))
    cols["score"] = pa.array(np.asarray(found["score"], np.float64))
    cols["pre_id"] = pa.array(np.asarray(found["pre_id"], np.uint64))
    cols["post_id"] = pa.array(np.asarray(found["post_id"], np.uint64))
    center = np.asarray(found["center"], np.float64).reshape(n, 3)
    table = pa.table({c: cols[c] for c in SYNAPSE_COLUMNS})
    for k, a in enumerate("zyx"):
        table = table.append_column(f"center_{a}", pa.array(center[:, k]))
    return table


def run_synapses(ds: Dataset, *, config: dict | SynapsesConfig | None = None, model=None,
                 executor: Executor | None = None, device: str = "cpu", overwrite: bool = False,
                 show_progress: bool | None = True, segmentation: str = SEGMENTATION) -> dict:
    """Detect synapses in ``raw/0`` blockwise and write ``em/synapses.parquet``.

    Parameters
    ----------
    ds : Dataset
        An EM store with ``raw`` and a complete ``em/segmentation``.
    config : dict or SynapsesConfig
        The ``[synapses]`` section (block shape, detection overrides, model path).
    model : SynapseModel or path, optional
        Default: ``config.model``.
    executor : Executor, optional
        From :func:`workflows.cluster.executor`; default threads.
    device : {'cpu', 'gpu', 'auto'}
        Where the pixel classifier runs.
    overwrite : bool
        Recompute even when the table is up to date.

    Returns
    -------
    dict
        ``synapses, blocks, blocks_run, candidates_seconds`` … (also in
        ``provenance.json`` under ``em.synapses``).

    Raises
    ------
    StageError
        No segmentation, an incomplete one, or no model.
    """
    t0 = time.perf_counter()
    cfg = config if isinstance(config, SynapsesConfig) else SynapsesConfig.from_dict(config)
    device = resolve_device(device)
    executor = executor or Executor(None)
    raw = _raw_em(ds)
    seg = check_segmentation(ds, segmentation)
    if tuple(seg.shape) != tuple(raw.shape):
        raise StoreError(f"{ds.path}: {segmentation} has shape {tuple(seg.shape)}, raw/0 has {tuple(raw.shape)}")
    model = _model(model if model is not None else cfg.model)
    params = DetectionParams.from_dict({**model.params.to_dict(), **cfg.detection})
    shape = tuple(int(s) for s in raw.shape)
    block_shape = tuple(min(int(b), s) for b, s in zip(cfg.block_shape, shape))
    halo = synapse_halo(model.spec, params)
    vs = tuple(float(v) for v in ds.voxel_size)
    if tuple(model.spec.voxel_size) != vs:
        ratio = np.asarray(model.spec.voxel_size) / np.asarray(vs)
        if not np.allclose(ratio, ratio[0], rtol=0.05):
            raise InputError(f"synapse model was trained at voxel size {model.spec.voxel_size}, the store's is {vs}: "
                             "train on data of the same anisotropy")
    params_rec = _plain({"segmentation": segmentation, "segmentation_written": _mtime(ds, seg),
                         "raw_written": _mtime(ds, raw), "model": _model_digest(model),
                         "detection": params.to_dict(), "block_shape": block_shape, "halo": halo})
    prev = ds.provenance.get(STAGE)
    if not overwrite and ds.has_table(st.SYNAPSES):
        if prev and prev.get("status") == "done" and prev.get("parameters") == params_rec:
            return {k: prev.get(k) for k in ("synapses", "blocks", "blocks_run")} | {"seconds": 0.0}
        # a table the store already holds (imported, or detected with other settings) is kept
        # unless the user asks: DESIGN.md, "not recomputed unless the user asks"
        n = ds.read_table(st.SYNAPSES, columns=["synapse_id"]).num_rows
        return {"synapses": n, "kept": "existing em/synapses.parquet (--overwrite synapses recomputes it)",
                "seconds": 0.0}
    scratch = ds.path / SCRATCH
    sig = _signature(params_rec)
    if scratch.exists() and (overwrite or not (scratch / f"signature-{sig}").exists()):
        shutil.rmtree(scratch)
    scratch.mkdir(parents=True, exist_ok=True)
    (scratch / f"signature-{sig}").touch()
    if ds.has_table(st.SYNAPSES):  # about to be replaced: never leave the old one looking current
        ds.table_path(st.SYNAPSES).unlink()
    blocks = block_grid(shape, block_shape, halo)
    ds.provenance.begin(STAGE, parameters=params_rec, device=device, blocks_total=len(blocks))
    todo = [b for b in blocks if not (scratch / f"block-{b.linear}.npz").exists()]
    raw_path, seg_path = raw.path, seg.path
    tasks = [dask.delayed(_synapse_block, pure=False)(str(ds.path), raw_path, seg_path, b, shape, model, params, vs,
                                                      str(scratch / f"block-{b.linear}.npz"), device,
                                                      dask_key_name=f"{STAGE}-{b.linear}") for b in todo]
    with progress(STAGE, len(blocks), enabled=show_progress) as advance:
        advance(len(blocks) - len(todo))
        try:
            executor.run(tasks, lambda _: advance())
        except BaseException:
            done = sum(1 for b in blocks if (scratch / f"block-{b.linear}.npz").exists())
            ds.provenance.update(STAGE, status="failed", blocks_done=done)
            raise
    parts = []
    for b in blocks:
        with np.load(scratch / f"block-{b.linear}.npz") as f:
            parts.append({k: f[k] for k in f.files})
    found = merge_duplicates(_merge(parts), vs, params.merge_distance)
    table = synapse_table(found)
    st.write_table(ds, st.SYNAPSES, table, row_group_size=1 << 20)
    if ds.provenance.get("graph.synapses"):  # an imported table was replaced
        ds.provenance.update("graph.synapses", status="replaced")
    shutil.rmtree(scratch)
    report = {"synapses": table.num_rows, "blocks": len(blocks), "blocks_run": len(todo),
              "unassigned": int(np.count_nonzero((found["pre_id"] == 0) | (found["post_id"] == 0)))}
    ds.provenance.end(STAGE, **report, seconds=round(time.perf_counter() - t0, 3))
    return report | {"seconds": time.perf_counter() - t0}


# ---------------------------------------------------------------- training
def train_synapses(ds: Dataset, labels, out, *, segmentation: str = SEGMENTATION, config=None, n_trees: int = 24,
                   max_depth: int = 12, seed: int = 0, device: str = "cpu") -> dict:
    """Train a synapse model from sparse labels over a store and save it to ``out`` (``.npz``).

    Parameters
    ----------
    labels : path (TIFF / Zarr) or array, shape of ``raw/0``
        0 unlabelled, 1 not a synapse, 2 synaptic cleft (and the
        post-synaptic density).
    segmentation : str
        Neurons of the store, for the candidates' partners.
    config : dict, optional
        The ``[synapses]`` section (detection parameters to train with).

    Only the bounding box of the labelled voxels (plus the model's context)
    is read.
    """
    from workflows.em import open_labels

    t0 = time.perf_counter()
    cfg = config if isinstance(config, SynapsesConfig) else SynapsesConfig.from_dict(config)
    raw = _raw_em(ds)
    seg = check_segmentation(ds, segmentation)
    shape = tuple(raw.shape)
    lab = labels if hasattr(labels, "shape") and not isinstance(labels, (str, Path)) else open_labels(labels, shape)
    if tuple(lab.shape) != shape:
        raise InputError(f"training labels have shape {tuple(lab.shape)}, expected {shape} like raw/0")
    lab_np = np.asarray(lab[...])
    if ((lab_np < 0) | (lab_np > 2)).any():
        bad = np.unique(lab_np[(lab_np < 0) | (lab_np > 2)])[:5].tolist()
        raise InputError(f"synapse training labels must be 0 (unlabelled), 1 (not a synapse) or 2 (cleft); found {bad}")
    where = np.nonzero(lab_np)
    if not where[0].size:
        raise InputError("synapse training labels are empty: label some voxels 1 (not a synapse) and 2 (cleft)")
    params = DetectionParams.from_dict(cfg.detection)
    halo = synapse_halo(synapse_feature_spec(ds.voxel_size), params)
    box = tuple(slice(max(int(w.min()) - h, 0), min(int(w.max()) + 1 + h, s)) for w, h, s in zip(where, halo, shape))
    image = to_device(np.asarray(raw[box]), device)
    model = train_synapse_model(image, lab_np[box], np.asarray(seg[box]), ds.voxel_size, params=params,
                                n_trees=n_trees, max_depth=max_depth, seed=seed)
    model.meta["dataset"] = str(ds.path)
    model.save(out)
    return {"out": str(out), **{k: model.meta[k] for k in ("candidates", "candidates_positive", "candidates_negative")},
            "object_classifier": model.meta["object_classifier"], "n_samples": model.meta["n_samples"],
            "seconds": round(time.perf_counter() - t0, 1)}


# ---------------------------------------------------------------- the CLI's synapse and graph stages
def run_synapse_stages(ds: Dataset, stages, *, synapses=None, config: dict | None = None, executor=None,
                       device: str = "cpu", overwrite=(), show_progress: bool | None = True) -> dict:
    """The ``synapses`` and ``graph`` stages of ``connectome em``, in order.

    ``synapses``: import ``synapses`` (a table) when given, else detect with
    the model of ``[synapses]``. ``graph``: :func:`workflows.graph.run_graph`
    (neurons; edges when there is a synapse table). ``config`` is the whole
    config file (``[synapses]``, ``[graph]`` with ``min_score`` and
    ``block_shape``).
    """
    import workflows.graph as wg

    config = dict(config or {})
    syn_cfg = SynapsesConfig.from_dict(config.get("synapses"))
    graph_cfg = dict(config.get("graph") or {})
    unknown = set(graph_cfg) - {"min_score", "block_shape", "coordinates"}
    if unknown:
        raise InputError(f"unknown [graph] setting(s): {', '.join(sorted(unknown))}; known: block_shape, coordinates, "
                         "min_score")
    out = {}
    for stage in stages:
        over = stage in overwrite
        if stage == "synapses":
            if synapses is not None:
                check_segmentation(ds)
                if ds.has_table(st.SYNAPSES) and not over:
                    prev = ds.provenance.get("graph.synapses")
                    if not (prev and prev.get("status") == "done"):
                        raise StoreError(f"{ds.path}: em/synapses.parquet exists (detected here); use --overwrite "
                                         "synapses to replace it with the imported table")
                try:
                    rep = wg.import_synapses(ds, synapses, coordinates=graph_cfg.get("coordinates", "voxel"),
                                             executor=executor, overwrite=over, show_progress=show_progress)
                except StoreError as e:
                    if "exists" in str(e):
                        raise StoreError(f"{ds.path}: em/synapses.parquet exists from another table; use "
                                         "--overwrite synapses to replace it") from None
                    raise
                if ds.provenance.get(STAGE):  # a detected table was replaced
                    ds.provenance.update(STAGE, status="replaced")
                out[stage] = {k: v for k, v in rep.items() if k != "seconds"} | {"seconds": rep["seconds"]}
            else:
                out[stage] = run_synapses(ds, config=syn_cfg, executor=executor, device=device, overwrite=over,
                                          show_progress=show_progress)
        elif stage == "graph":
            rep = wg.run_graph(ds, min_score=graph_cfg.get("min_score"), block_shape=graph_cfg.get("block_shape"),
                               executor=executor, device=device, overwrite=over, show_progress=show_progress)
            flat = {"neurons": rep.get("neurons")}
            if "edges" in rep:
                flat["edges"] = rep["edges"]["edges"]
                flat["synapses_used"] = rep["edges"]["used"]
            flat["seconds"] = rep["seconds"]
            out[stage] = {k: v for k, v in flat.items() if v is not None}
        else:
            raise InputError(f"not a synapse/graph stage: {stage}")
    return out
