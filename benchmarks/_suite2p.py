"""Shared pieces for benchmarks that run suite2p in its own virtual environment.

suite2p 1.1 (CPU torch) lives in a separate venv (default ``/tmp/s2p``); a
benchmark re-runs its own file under that interpreter with a ``--suite2p-child``
argument and reads back one ``RESULT {json}`` line. This module is imported by
both interpreters, so it needs only the standard library and NumPy.

* :func:`prepare_child_imports` — call first in the child, before ``import
  suite2p``: the torchvision wheel next to the CPU torch is a CUDA build whose
  meta registrations fail (``operator torchvision::nms does not exist``); a
  stub module for ``torchvision._meta_registrations`` lets it import, and
  suite2p's CPU paths never use those registrations.
* :func:`child_env` — the environment for the child (no ``PYTHONPATH`` of ours).
* :func:`parse_result` — the ``RESULT`` line of a child's output, or an error.
* :func:`run_child` — run a benchmark file under the suite2p interpreter as a child
  (``--suite2p-child ARGS``) and return its parsed ``RESULT``.
* :func:`stat_to_labels` — suite2p ROIs (``ypix, xpix, lam``) as a label image,
  the largest ``lam`` winning where ROIs overlap (as in ``benchmarks/detection.py``).
* :func:`measure` — run a command, wall time, CPU time and peak memory of its
  whole process tree (Dask workers included).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
import types
from pathlib import Path

import numpy as np

DEFAULT_PYTHON = "/tmp/s2p/bin/python"
STUB_DIR = "/tmp/s2pstub"


def prepare_child_imports() -> None:
    """Make ``import suite2p`` work under the suite2p venv (see the module notes)."""
    if os.path.isdir(STUB_DIR) and STUB_DIR not in sys.path:
        sys.path.insert(0, STUB_DIR)
    sys.modules.setdefault("torchvision._meta_registrations", types.ModuleType("torchvision._meta_registrations"))


def child_env() -> dict:
    env = dict(os.environ)
    env.pop("PYTHONPATH", None)
    return env


def parse_result(stdout: str, stderr: str, returncode: int) -> dict:
    """The last ``RESULT {json}`` line of a child's stdout, or ``{"error": ...}``."""
    lines = [ln for ln in stdout.splitlines() if ln.startswith("RESULT ")]
    if returncode != 0 or not lines:
        tail = (stderr or stdout).strip().splitlines()[-5:]
        return {"error": " | ".join(tail) or f"exit {returncode}"}
    return json.loads(lines[-1][len("RESULT "):])


def run_child(python: str, script, args: list[str]) -> dict:
    """``python script --suite2p-child *args`` in a neutral folder; its ``RESULT`` or ``{"error": ...}``."""
    import tempfile

    cmd = [python, str(Path(script).resolve()), "--suite2p-child", *[str(a) for a in args]]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=child_env(), cwd=tempfile.gettempdir())
    return parse_result(proc.stdout, proc.stderr, proc.returncode)


def stat_to_labels(stat, shape) -> np.ndarray:
    """Label image ``(Y, X)`` int32 from suite2p's ``stat`` (ROI ``i`` → label ``i + 1``)."""
    lab = np.zeros(shape, np.int32)
    best = np.zeros(shape, np.float64)
    for i, s in enumerate(stat):
        lam = np.asarray(s["lam"], np.float64)
        y, x = np.asarray(s["ypix"]), np.asarray(s["xpix"])
        win = lam > best[y, x]
        lab[y[win], x[win]] = i + 1
        best[y[win], x[win]] = lam[win]
    return lab


def _vm_hwm_kib(pid: int) -> int:
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1])
    except OSError:
        pass
    return 0


def measure(cmd: list[str], *, env: dict | None = None, cwd: str | None = None, log: Path | None = None,
            interval: float = 0.2, timeout: float | None = None) -> dict:
    """Run ``cmd`` to completion; return its wall time, CPU time and peak memory.

    Memory is measured two ways: ``peak_tree_rss_mb``, the largest sum of the
    resident set sizes of the process and all its descendants over samples
    taken every ``interval`` seconds (what the machine had to hold at once,
    to within the sampling), and ``max_process_hwm_mb``, the largest single
    process's high-water mark (``VmHWM``; exact, from ``/proc`` and the
    kernel's ``ru_maxrss`` of the reaped child). ``cpu_s`` is user + system
    time of the process and the children it waited for (Dask worker processes
    included when their nanny reaps them).
    """
    import psutil

    out = open(log, "w") if log is not None else subprocess.DEVNULL
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, env=env, cwd=cwd, stdout=out, stderr=subprocess.STDOUT)
    peak_tree = 0
    hwm: dict[int, int] = {}
    n_procs = 1
    stop = threading.Event()

    def sample():
        nonlocal peak_tree, n_procs
        while not stop.is_set():
            try:
                root = psutil.Process(proc.pid)
                procs = [root] + root.children(recursive=True)
            except psutil.Error:
                procs = []
            total = 0
            for p in procs:
                try:
                    total += p.memory_info().rss
                except psutil.Error:
                    continue
                hwm[p.pid] = max(hwm.get(p.pid, 0), _vm_hwm_kib(p.pid))
            n_procs = max(n_procs, len(procs))
            peak_tree = max(peak_tree, total)
            stop.wait(interval)

    th = threading.Thread(target=sample, daemon=True)
    th.start()
    try:
        _, status, usage = os.wait4(proc.pid, 0) if timeout is None else _wait4_timeout(proc, timeout)
    finally:
        stop.set()
        th.join()
        if out is not subprocess.DEVNULL:
            out.close()
    wall = time.perf_counter() - t0
    proc.returncode = os.waitstatus_to_exitcode(status)
    return {"returncode": proc.returncode, "wall_s": round(wall, 3),
            "cpu_s": round(usage.ru_utime + usage.ru_stime, 2),
            "peak_tree_rss_mb": round(peak_tree / 2**20, 1),
            "max_process_hwm_mb": round(max(max(hwm.values(), default=0), usage.ru_maxrss) / 1024, 1),
            "max_processes": n_procs, "command": " ".join(map(str, cmd))}


def _wait4_timeout(proc, timeout: float):
    deadline = time.perf_counter() + timeout
    while True:
        pid, status, usage = os.wait4(proc.pid, os.WNOHANG)
        if pid:
            return pid, status, usage
        if time.perf_counter() > deadline:
            import psutil

            for p in psutil.Process(proc.pid).children(recursive=True):
                p.kill()
            proc.kill()
            return os.wait4(proc.pid, 0)
        time.sleep(0.2)
