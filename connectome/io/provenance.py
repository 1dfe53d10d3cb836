"""``provenance.json``: what each stage ran with, where, when and how far.

One entry per stage: ``status`` (``running`` → ``done`` or ``failed``),
parameters, software versions, device, start/end times (UTC, ISO 8601),
blocks done of blocks total, and free-form metrics. Only the driver process
writes the file, and it writes it atomically (temporary file + rename).
"""

from __future__ import annotations

import json
import os
import platform
import sys
from datetime import datetime, timezone
from importlib import metadata
from pathlib import Path

from connectome.errors import StoreError

FORMAT = "connectome-provenance/1"

_PACKAGES = ("connectome", "numpy", "scipy", "scikit-image", "zarr", "dask", "distributed", "cupy-cuda12x")


def now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="milliseconds")


def software_versions() -> dict:
    out = {"python": platform.python_version()}
    for name in _PACKAGES:
        if name.startswith("cupy") and "cupy" not in sys.modules:
            continue
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            pass
    return out


class Provenance:
    """Reader/writer of one store's ``provenance.json``."""

    def __init__(self, path):
        self.path = Path(path)

    def load(self) -> dict:
        if not self.path.exists():
            return {"format": FORMAT, "stages": {}}
        try:
            data = json.loads(self.path.read_text())
        except (OSError, ValueError) as e:
            raise StoreError(f"{self.path}: unreadable provenance ({e})") from None
        data.setdefault("stages", {})
        return data

    def _save(self, data: dict) -> None:
        tmp = self.path.with_name(self.path.name + f".tmp-{os.getpid()}")
        tmp.write_text(json.dumps(data, indent=2, default=_jsonable))
        os.replace(tmp, self.path)

    def stages(self) -> dict:
        return self.load()["stages"]

    def get(self, stage: str) -> dict | None:
        return self.stages().get(stage)

    def is_done(self, stage: str) -> bool:
        entry = self.get(stage)
        return bool(entry and entry.get("status") == "done")

    def update(self, stage: str, **fields) -> dict:
        data = self.load()
        entry = data["stages"].setdefault(stage, {})
        entry.update(fields)
        self._save(data)
        return entry

    def begin(self, stage: str, *, parameters: dict | None = None, device: str = "cpu", blocks_total=None) -> dict:
        """Mark ``stage`` running (keeps ``started`` of an earlier, interrupted try)."""
        prev = self.get(stage) or {}
        fields = {
            "status": "running",
            "parameters": parameters or {},
            "versions": software_versions(),
            "device": device,
            "started": prev.get("started") if prev.get("status") == "running" else now(),
            "resumed": prev.get("status") == "running",
            "finished": None,
        }
        if blocks_total is not None:
            fields["blocks_total"] = int(blocks_total)
            fields.setdefault("blocks_done", prev.get("blocks_done", 0) if fields["resumed"] else 0)
        return self.update(stage, **fields)

    def end(self, stage: str, status: str = "done", **fields) -> dict:
        return self.update(stage, status=status, finished=now(), **fields)


def _jsonable(o):
    try:
        import numpy as np

        if isinstance(o, np.generic):
            return o.item()
        if isinstance(o, np.ndarray):
            return o.tolist()
    except ImportError:
        pass
    if isinstance(o, (set, tuple)):
        return list(o)
    if isinstance(o, Path):
        return str(o)
    return str(o)
