"""Peak memory of every EM stage, 1× vs 4× the volume at the same block size (issue #8).

A synthetic serial-section volume (``connectome.synth.em.make_volume``, seed 0,
40 × 8 × 8 nm) of ``4 × Z`` sections is drawn once; the 1× store holds its
first ``Z`` sections, the 4× store all of them. Each stage
(``boundaries``, ``fragments``, ``agglomeration``) runs as its own
``connectome em STORE --stages STAGE --cluster threads`` command in a fresh
process (threaded scheduler: one process, so its peak is the peak). The peak
is the process's ``VmHWM`` (read from ``/proc/self/status`` when the command
returns) and, as a check, the largest RSS seen by polling it every 20 ms with
psutil. Goal: 4×/1× ≤ 1.2 for every stage.

The driver of the agglomeration stage holds the region graph (one row per
supervoxel contact) and the lookup table (one entry per supervoxel): that is
the part that grows with the volume, reported as ``n_fragments`` and
``n_edges`` next to the peaks.

Chunks matter: a block read with a halo decodes whole neighbouring chunks, and
a pyramid level is built one destination chunk per task, so with chunks as
large as the block the 1× volume keeps fewer tasks in flight than the 4×
one. The default ``[em] chunks`` (16 × 128 × 128) are used.

Run: ``python benchmarks/em_memory.py [--sections 32] [--size 512] [--block 32,256,256]
[--chunks 16,128,128] [--json benchmarks/results/em-memory.json]``
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

RUN = r"""
import sys
from connectome.cli import main
code = main(sys.argv[1:])
for line in open("/proc/self/status"):
    if line.startswith("VmHWM:"):
        print("VMHWM_KB", int(line.split()[1]), file=sys.stderr)
sys.exit(code)
"""

BASELINE = r"""
import sys
import connectome.cli, workflows.em, connectome.em  # what every command imports before it works
for line in open("/proc/self/status"):
    if line.startswith("VmHWM:"):
        print(int(line.split()[1]))
"""


def make_store(path: Path, image: np.ndarray, chunks) -> None:
    from connectome.io import Dataset, axes_for, create_multiscale
    from workflows.pyramid import build_pyramid

    ds = Dataset.create(path, overwrite=True)
    g = create_multiscale(ds.root, "raw", shape=image.shape, dtype=image.dtype, chunks=chunks,
                          axes=axes_for("em", 3), scale=(40.0, 8.0, 8.0))
    for z in range(0, image.shape[0], chunks[0]):
        g["0"][z : z + chunks[0]] = np.asarray(image[z : z + chunks[0]])
    build_pyramid(g)
    ds.root.attrs["connectome"] = {"kind": "em"}


def run_stage(store: Path, stage: str, config: Path | None, command: str = "em") -> dict:
    """Run one stage of ``connectome COMMAND`` in a fresh process; its time, VmHWM and polled peak."""
    import psutil

    cmd = [sys.executable, "-c", RUN, command, str(store), "--stages", stage, "--overwrite", stage,
           "--cluster", "threads"] + (["--config", str(config)] if config else [])
    env = {**os.environ, "PYTHONPATH": str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, cwd=str(REPO))
    peak = 0
    p = psutil.Process(proc.pid)
    while proc.poll() is None:
        try:
            peak = max(peak, p.memory_info().rss + sum(c.memory_info().rss for c in p.children(recursive=True)))
        except psutil.Error:
            pass
        time.sleep(0.02)
    out, err = proc.communicate()
    seconds = time.perf_counter() - t0
    if proc.returncode != 0:
        raise RuntimeError(f"{stage} on {store.name}: exit {proc.returncode}: {err.strip()[-500:]}")
    hwm = [int(line.split()[1]) for line in err.splitlines() if line.startswith("VMHWM_KB")]
    from connectome.io import Dataset

    prov = Dataset(store).provenance.get(f"{command}.{stage}") or {}
    return {"stage": stage, "seconds": round(seconds, 2), "vmhwm_mb": round(hwm[-1] / 1024, 1) if hwm else None,
            "polled_peak_mb": round(peak / 2**20, 1), "metrics": prov.get("metrics", {})}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sections", type=int, default=32, help="Z of the 1× volume (4× has 4 × Z)")
    ap.add_argument("--size", type=int, default=512, help="Y = X of the volume")
    ap.add_argument("--block", default="32,256,256")
    ap.add_argument("--chunks", default="16,128,128", help="chunks of every array (the [em] default)")
    ap.add_argument("--work", default=None)
    ap.add_argument("--json", type=Path)
    args = ap.parse_args(argv)
    block = [int(b) for b in args.block.split(",")]
    chunks = [int(c) for c in args.chunks.split(",")]
    tmp = Path(tempfile.mkdtemp(prefix="bench-em-memory-", dir=args.work))
    rows = []
    try:
        from connectome.synth.em import make_volume

        t0 = time.perf_counter()
        image, _ = make_volume((4 * args.sections, args.size, args.size), voxel_size=(40.0, 8.0, 8.0), seed=0)
        print(f"synthetic volume {image.shape}: {time.perf_counter() - t0:.0f} s", flush=True)
        config = tmp / "em.json"
        config.write_text(json.dumps({"em": {"block_shape": block, "chunks": chunks}}))
        stores = {"1x": tmp / "x1.zarr", "4x": tmp / "x4.zarr"}
        make_store(stores["1x"], image[: args.sections], chunks)
        make_store(stores["4x"], image, chunks)
        del image
        env = {**os.environ, "PYTHONPATH": str(REPO)}
        base = subprocess.run([sys.executable, "-c", BASELINE], capture_output=True, text=True, env=env,
                              cwd=str(REPO), check=True)
        baseline_mb = round(int(base.stdout.strip()) / 1024, 1)
        print(f"imports alone: {baseline_mb} MB", flush=True)
        for stage in ("boundaries", "fragments", "agglomeration"):
            for size, store in stores.items():
                r = run_stage(store, stage, config)
                r["size"] = size
                rows.append(r)
                m = r["metrics"]
                extra = f", {m.get('n_fragments')} fragments, {m.get('n_edges')} edges" if "n_edges" in m else ""
                print(f"{stage:14s} {size}: {r['seconds']:7.1f} s  VmHWM {r['vmhwm_mb']:8.1f} MB  "
                      f"(polled {r['polled_peak_mb']:8.1f} MB){extra}", flush=True)
        by = {(r["stage"], r["size"]): r for r in rows}
        summary = {}
        for stage in ("boundaries", "fragments", "agglomeration"):
            one, four = by[(stage, "1x")], by[(stage, "4x")]
            summary[stage] = {
                "peak_4x_over_1x": round(four["vmhwm_mb"] / one["vmhwm_mb"], 3),
                "above_imports_4x_over_1x": round((four["vmhwm_mb"] - baseline_mb)
                                                  / max(one["vmhwm_mb"] - baseline_mb, 1e-9), 3),
            }
        print(json.dumps(summary, indent=2))
        if args.json:
            args.json.parent.mkdir(parents=True, exist_ok=True)
            args.json.write_text(json.dumps({
                "shape_1x": [args.sections, args.size, args.size], "shape_4x": [4 * args.sections, args.size,
                                                                               args.size],
                "block_shape": block, "chunks": chunks, "imports_mb": baseline_mb, "rows": rows,
                "summary": summary, "machine": f"{platform.node()} {os.cpu_count()} cores",
                "date": time.strftime("%Y-%m-%d"),
            }, indent=2))
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
