"""Scaling and memory of a pipeline stage (two-photon registration + summary).

* strong scaling: the same movie with 1 and 2 LocalCluster workers;
* weak scaling: 1× and 4× the frames, same workers;
* peak memory, 1× vs 4× data: the whole ``connectome twophoton`` command in
  a fresh process with ``--cluster threads`` (one process, so its VmHWM is
  the peak), and with ``--cluster local`` (peak summed RSS of the command and
  its worker processes, sampled every 50 ms). Goal: 4×/1× ≤ 1.2.

Run: ``python benchmarks/scaling.py [--frames 1000] [--size 256] [--json out.json]``
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np


def make_store(path: Path, frames: int, size: int) -> None:
    from connectome.io import Dataset, axes_for, create_multiscale
    from connectome.synth.twophoton import iter_movie
    from workflows.pyramid import build_pyramid

    truth, chunks = iter_movie((frames, size, size), time_chunk=100, motion="rigid", seed=0)
    ds = Dataset.create(path, overwrite=True)
    g = create_multiscale(ds.root, "raw", shape=(frames, size, size), dtype=np.uint16, chunks=(100, size, size),
                          axes=axes_for("twophoton", 3), scale=(1 / 15, 1, 1))
    for t0, block in chunks:
        g["0"][t0 : t0 + len(block)] = block
    build_pyramid(g)


def run_cli(store: Path, cluster: str, workers: int | None = None) -> dict:
    """Run ``connectome twophoton`` and sample the RSS of its process tree."""
    import psutil

    cmd = [sys.executable, "-m", "connectome.cli", "twophoton", str(store), "--stages", "registration,summary",
           "--cluster", cluster, "--overwrite", "registration", "--overwrite", "summary"]
    env = None
    if workers:
        import os

        env = {**os.environ, "CONNECTOME_LOCAL_WORKERS": str(workers)}
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    peak = 0
    p = psutil.Process(proc.pid)
    while proc.poll() is None:
        try:
            rss = p.memory_info().rss + sum(c.memory_info().rss for c in p.children(recursive=True))
            peak = max(peak, rss)
        except psutil.Error:
            pass
        time.sleep(0.05)
    out, err = proc.communicate()
    seconds = time.perf_counter() - t0
    if proc.returncode != 0:
        raise RuntimeError(err.strip().splitlines()[-1] if err.strip() else f"exit {proc.returncode}")
    from connectome.io import Dataset

    stage = Dataset(store).provenance.get("twophoton.registration")
    return {"seconds": round(seconds, 2), "stage_seconds": stage.get("seconds"), "peak_rss_mb": round(peak / 2**20, 1)}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--frames", type=int, default=1000)
    ap.add_argument("--size", type=int, default=256)
    ap.add_argument("--json", type=Path)
    args = ap.parse_args(argv)
    tmp = Path(tempfile.mkdtemp(prefix="bench-scaling-"))
    rows = []
    try:
        one, four = tmp / "x1.zarr", tmp / "x4.zarr"
        make_store(one, args.frames, args.size)
        make_store(four, 4 * args.frames, args.size)
        for label, store, cluster, workers in [
            ("1x threads", one, "threads", None), ("4x threads", four, "threads", None),
            ("1x local, 1 worker", one, "local", 1), ("1x local, 2 workers", one, "local", 2),
            ("4x local, 2 workers", four, "local", 2),
        ]:
            r = run_cli(store, cluster, workers)
            r.update(run=label)
            rows.append(r)
            print(f"{label:22s} {r['seconds']:7.1f} s (stage {r['stage_seconds']} s)  peak {r['peak_rss_mb']:8.1f} MB",
                  flush=True)
        by = {r["run"]: r for r in rows}
        summary = {
            "strong_scaling_speedup_1_to_2_workers": round(by["1x local, 1 worker"]["stage_seconds"]
                                                          / by["1x local, 2 workers"]["stage_seconds"], 2),
            "weak_scaling_time_ratio_4x_over_1x": round(by["4x local, 2 workers"]["stage_seconds"]
                                                        / by["1x local, 2 workers"]["stage_seconds"], 2),
            "peak_memory_4x_over_1x_threads": round(by["4x threads"]["peak_rss_mb"] / by["1x threads"]["peak_rss_mb"], 2),
            "peak_memory_4x_over_1x_local": round(by["4x local, 2 workers"]["peak_rss_mb"]
                                                  / by["1x local, 2 workers"]["peak_rss_mb"], 2),
        }
        print(json.dumps(summary, indent=2))
        if args.json:
            args.json.write_text(json.dumps({"rows": rows, "summary": summary, "frames": args.frames,
                                             "size": args.size}, indent=2))
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
