"""Proofreading a segmentation: merge, split, undo, redo, with a durable edit log.

Every edit is first written down, then applied:

1. ``em/edits/NNNNNN.npz`` — the whole level-0 chunks the edit touches,
   before and after (compressed; label chunks compress well). With both,
   an edit can be applied, undone, redone and replayed exactly without
   reading the segmentation, so even a chunk torn by a crash mid-write is
   restored.
2. ``em/edits.jsonl`` — one line per edit, appended and flushed to disk
   (``fsync``): ``seq, op, ids, new_ids, bbox, time, user`` (+ ``target`` for
   undo / redo). The line is the commit point.
3. The after (or, for an undo, the before) chunks are written into level 0
   of ``em/segmentation`` — whole chunks, so writes are chunk-aligned — and
   the coarser levels covering the box are recomputed.
4. ``em/edits/state.json`` records the last edit whose chunks are written
   (``applied``) and the last whose graph tables are updated (``tables``).
5. The graph tables are updated for the touched neurons: their rows of
   ``graph/neurons.parquet`` (size, centroid, box) are recomputed from the
   voxels, synapse points inside the edited box are looked up again in
   ``em/synapses.parquet``, and ``graph/edges.parquet`` is rebuilt.

Opening a :class:`Proofreader` replays every logged edit after ``applied``
(an edit already applied is never applied twice: state and log agree) and
brings the tables up to date, so edits survive a crash of the viewer.
"""

from __future__ import annotations

import getpass
import itertools
import json
import os
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

import numpy as np

from connectome.errors import InputError, StageError, StoreError
from connectome.io import Dataset
from connectome.io.ome import downsample, level_factors, read_multiscale
from connectome.review._atomic import append_line, replace_durably, write_json

SEGMENTATION = "em/segmentation"
BOUNDARIES = "em/boundaries"
LOG = "em/edits.jsonl"
RECORDS = "em/edits"
EDIT_OPS = ("merge", "split")
HISTORY_OPS = ("undo", "redo")


@dataclass(frozen=True)
class Edit:
    """One line of the edit log.

    Attributes
    ----------
    seq : int
        Position in the log, from 1.
    op : {'merge', 'split', 'undo', 'redo'}
    ids : tuple of int
        Segments the user named: ``(kept, absorbed)`` for a merge, ``(segment,)``
        for a split; for undo / redo, those of the target edit.
    new_ids : tuple of int
        Ids a split created (for undo / redo: the target's).
    bbox : tuple of two tuples of int
        ``(lo, hi)``, half-open box of level-0 voxels that changed.
    time, user : str
        ISO-8601 UTC time and user name.
    target : int or None
        The edit an undo / redo acts on.
    n_voxels : int
        Voxels whose label changed.
    record : str
        The ``.npz`` with the before / after chunks (relative to the store).
    """

    seq: int
    op: str
    ids: tuple
    new_ids: tuple
    bbox: tuple
    time: str
    user: str
    target: int | None
    n_voxels: int
    record: str
    extra: dict = field(default_factory=dict, compare=False)

    @property
    def touched(self) -> tuple[int, ...]:
        """Every segment id whose voxels this edit changes."""
        return tuple(sorted(set(self.ids) | set(self.new_ids)))

    def to_json(self) -> dict:
        d = {"seq": self.seq, "op": self.op, "ids": list(self.ids), "new_ids": list(self.new_ids),
             "bbox": [list(self.bbox[0]), list(self.bbox[1])], "time": self.time, "user": self.user,
             "target": self.target, "n_voxels": self.n_voxels, "record": self.record}
        d.update(self.extra)
        return d

    @classmethod
    def from_json(cls, d: dict) -> "Edit":
        known = {"seq", "op", "ids", "new_ids", "bbox", "time", "user", "target", "n_voxels", "record"}
        return cls(int(d["seq"]), str(d["op"]), tuple(int(i) for i in d["ids"]),
                   tuple(int(i) for i in d.get("new_ids", ())),
                   (tuple(int(v) for v in d["bbox"][0]), tuple(int(v) for v in d["bbox"][1])),
                   str(d.get("time", "")), str(d.get("user", "")),
                   None if d.get("target") is None else int(d["target"]), int(d.get("n_voxels", 0)),
                   str(d["record"]), {k: v for k, v in d.items() if k not in known})


def _user() -> str:
    user = os.environ.get("CONNECTOME_USER")
    if user:
        return user
    try:
        return getpass.getuser()
    except Exception:  # pragma: no cover - no login name (containers)
        return "unknown"


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="milliseconds")


def _chunk_indices(lo, hi, chunks):
    """Indices of the chunks that overlap the half-open box ``[lo, hi)``."""
    return itertools.product(*(range(l // c, (h - 1) // c + 1) for l, h, c in zip(lo, hi, chunks)))


def _chunk_region(idx, chunks, shape) -> tuple[slice, ...]:
    return tuple(slice(i * c, min((i + 1) * c, s)) for i, c, s in zip(idx, chunks, shape))


def _as_id(value, what: str) -> int:
    try:
        v = int(value)
    except (TypeError, ValueError):
        raise InputError(f"{what} must be a segment id (a positive integer), got {value!r}") from None
    if v <= 0 or v != value:
        raise InputError(f"{what} must be a segment id (a positive integer), got {value!r}")
    return v


class Proofreader:
    """Merge and split segments of a store's segmentation, with undo, redo and a durable log.

    Parameters
    ----------
    dataset : str, Path or Dataset
        An EM store with ``em/segmentation`` (OME-NGFF label image, (Z, Y, X)
        integer) and, for splits, ``em/boundaries`` (1 or 255 = membrane).
    user : str, optional
        Name written in the log; default ``$CONNECTOME_USER`` or the login name.
    update_graph : bool
        Keep ``graph/neurons.parquet``, ``em/synapses.parquet`` and
        ``graph/edges.parquet`` up to date after each edit (where they exist).

    Notes
    -----
    Splits are a seeded watershed (Beucher & Meyer 1993;
    :func:`skimage.segmentation.watershed`) of the boundary map inside the
    segment's bounding box, restricted to the segment's voxels, from seeds
    the user paints (two or more labels). The piece with the most voxels
    keeps the segment's id; the others get new ids above every id ever used.
    A merge relabels the second segment to the first. The log design
    (write-ahead record, commit line, idempotent whole-chunk writes) follows
    the write-ahead logging of databases (Mohan et al. 1992, ARIES).

    Examples
    --------
    >>> pr = Proofreader("em.zarr")                       # doctest: +SKIP
    >>> pr.merge(12, 40)                                   # doctest: +SKIP
    >>> pr.undo()                                          # doctest: +SKIP
    """

    def __init__(self, dataset, *, segmentation: str = SEGMENTATION, boundaries: str = BOUNDARIES,
                 user: str | None = None, update_graph: bool = True):
        self.ds = dataset if isinstance(dataset, Dataset) else Dataset(dataset)
        self.segmentation = segmentation
        self.boundaries = boundaries
        self.user = user or _user()
        self.update_graph = update_graph
        if segmentation not in self.ds:
            raise StageError(f"{self.ds.path}: no {segmentation} to proofread; run the EM segmentation stages first")
        if not self.ds.is_complete(segmentation):
            raise StageError(f"{self.ds.path}: {segmentation} is incomplete (its stage was interrupted); finish it first")
        self.group = self.ds.node(segmentation)
        self.array = self.ds.array(segmentation, 0)
        if self.array.ndim != 3 or np.dtype(self.array.dtype).kind not in "ui":
            raise InputError(f"{segmentation}: expected a 3-D integer label image, found {self.array.ndim}-D "
                             f"{self.array.dtype}")
        self.log_path = self.ds.path / LOG
        self.records_dir = self.ds.path / RECORDS
        self.state_path = self.records_dir / "state.json"
        self.replayed: list[int] = self.recover()

    # ------------------------------------------------------------ the log
    def _read_log(self) -> list[Edit]:
        if not self.log_path.is_file():
            return []
        raw = self.log_path.read_bytes()
        # only newline-terminated lines were committed; a tail without one was torn by a crash
        committed = raw[: raw.rfind(b"\n") + 1]
        entries = []
        for i, line in enumerate(committed.split(b"\n")):
            if not line.strip():
                continue
            try:
                entries.append(Edit.from_json(json.loads(line)))
            except (ValueError, KeyError, TypeError, IndexError):
                raise StoreError(f"{self.log_path}: line {i + 1} is not a valid edit record") from None
        if len(committed) < len(raw):  # drop the torn tail so the next append starts on a clean line
            with open(self.log_path, "r+b") as f:
                f.truncate(len(committed))
                os.fsync(f.fileno())
        for k, e in enumerate(entries, start=1):
            if e.seq != k:
                raise StoreError(f"{self.log_path}: edit {k} has sequence number {e.seq}; the log is damaged")
        return entries

    @property
    def edits(self) -> list[Edit]:
        """Every edit in the log, oldest first."""
        return list(self._entries)

    def _state(self) -> dict:
        if self.state_path.is_file():
            try:
                return json.loads(self.state_path.read_text())
            except ValueError:
                raise StoreError(f"{self.state_path}: unreadable edit state") from None
        return {"applied": 0, "tables": 0}

    def _save_state(self, **changes) -> None:
        state = self._state() | changes
        write_json(self.state_path, state)

    def _token(self, create: bool = False) -> str | None:
        """An id written into the segmentation's attributes at the first edit.

        A segmentation rewritten by a stage loses it, so an old log is never
        replayed onto a segmentation it was not made for.
        """
        meta = dict(self.group.attrs.get("connectome", {}))
        token = meta.get("edit_log")
        if token is None and create:
            import uuid

            token = uuid.uuid4().hex
            meta["edit_log"] = token
            self.group.attrs["connectome"] = meta
        return token

    def _stacks(self, entries=None) -> tuple[list[int], list[int]]:
        undo, redo = [], []
        for e in self._entries if entries is None else entries:
            if e.op in EDIT_OPS:
                undo.append(e.seq)
                redo.clear()
            elif e.op == "undo":
                redo.append(undo.pop())
            elif e.op == "redo":
                undo.append(redo.pop())
        return undo, redo

    @property
    def can_undo(self) -> bool:
        return bool(self._stacks()[0])

    @property
    def can_redo(self) -> bool:
        return bool(self._stacks()[1])

    # ------------------------------------------------------------ recovery
    def recover(self) -> list[int]:
        """Replay logged edits whose chunks may not all be written; refresh stale tables.

        Returns the sequence numbers replayed (empty after a clean exit).
        """
        self._entries = self._read_log()
        state = self._state()
        token = state.get("token")
        if token and self._entries and token != self._token():
            raise StoreError(
                f"{self.ds.path}/{self.segmentation} was rewritten after the edits in {LOG} were made; "
                f"move {LOG} and {RECORDS}/ away to start a new edit log")
        applied = int(state.get("applied", 0))
        replayed = []
        for e in self._entries:
            if e.seq > applied:
                self._write(e)
                self._save_state(applied=e.seq)
                replayed.append(e.seq)
        tables = int(state.get("tables", 0))
        pending = [e for e in self._entries if e.seq > tables]
        if pending and self.update_graph:
            self._update_tables(pending)
        if pending:
            self._save_state(tables=self._entries[-1].seq)
        return replayed

    # ------------------------------------------------------------ queries
    def segment_at(self, position) -> int:
        """Segment id at a level-0 voxel position ``(z, y, x)`` (floats are rounded)."""
        p = tuple(int(np.floor(float(v) + 0.5)) for v in position)
        if len(p) != 3 or any(v < 0 or v >= s for v, s in zip(p, self.array.shape)):
            raise InputError(f"position {tuple(position)} is outside {self.segmentation} of shape {self.array.shape}")
        return int(self.array[p])

    def _table_box(self, segment: int):
        """Bounding box from graph/neurons.parquet, if the table describes this segmentation."""
        from connectome.graph import _store as st

        if not self.ds.has_table(st.NEURONS):
            return None
        prov = self.ds.provenance.get("graph.neurons") or {}
        params = prov.get("parameters") or {}
        meta = self.ds.path / self.array.path / "zarr.json"
        if params.get("segmentation") not in (None, self.segmentation) or (
                "written" in params and meta.is_file() and params["written"] != meta.stat().st_mtime_ns):
            return None  # the table was computed from another segmentation
        import pyarrow.compute as pc

        cols = ["neuron_id", "z_min", "y_min", "x_min", "z_max", "y_max", "x_max"]
        t = st.read_store_table(self.ds, st.NEURONS, ("neuron_id",), columns=cols)
        if not all(c in t.column_names for c in cols):
            return None
        row = t.filter(pc.equal(t.column("neuron_id"), pa_uint(segment)))
        if row.num_rows != 1:
            return None
        lo = tuple(int(row.column(f"{a}_min")[0].as_py()) for a in "zyx")
        hi = tuple(int(row.column(f"{a}_max")[0].as_py()) + 1 for a in "zyx")
        return lo, hi

    def bbox(self, segment) -> tuple[tuple[int, ...], tuple[int, ...]]:
        """Half-open level-0 bounding box ``(lo, hi)`` of a segment.

        Taken from ``graph/neurons.parquet`` when it describes this
        segmentation (kept up to date by every edit), else found by reading
        the segmentation chunk by chunk.
        """
        segment = _as_id(segment, "segment")
        box = self._table_box(segment)
        if box is not None:
            return box
        arr = self.array
        lo = np.full(3, np.iinfo(np.int64).max)
        hi = np.full(3, -1)
        step = (arr.chunks[0],) + tuple(arr.shape[1:])
        for z0 in range(0, arr.shape[0], step[0]):
            block = arr[z0 : z0 + step[0]]
            idx = np.nonzero(block == segment)
            if idx[0].size:
                pts_lo = np.array([idx[0].min() + z0, idx[1].min(), idx[2].min()])
                pts_hi = np.array([idx[0].max() + z0, idx[1].max(), idx[2].max()])
                lo, hi = np.minimum(lo, pts_lo), np.maximum(hi, pts_hi)
        if hi[0] < 0:
            raise InputError(f"segment {segment} does not exist in {self.segmentation}")
        return tuple(int(v) for v in lo), tuple(int(v) + 1 for v in hi)

    def _next_id(self) -> int:
        state = self._state()
        best = int(state.get("next_id", 0))
        for e in self._entries:
            if e.new_ids:
                best = max(best, max(e.new_ids) + 1)
        if best:
            return best
        from connectome.graph import _store as st

        top = 0
        arr = self.array
        for z0 in range(0, arr.shape[0], arr.chunks[0]):
            top = max(top, int(arr[z0 : z0 + arr.chunks[0]].max(initial=0)))
        if self.ds.has_table(st.NEURONS):
            ids = st.read_store_table(self.ds, st.NEURONS, ("neuron_id",), columns=["neuron_id"])
            if ids.num_rows:
                top = max(top, int(ids.column("neuron_id").to_numpy().max()))
        return top + 1

    # ------------------------------------------------------------ edits
    def merge(self, keep, absorb) -> Edit:
        """Merge segment ``absorb`` into ``keep`` (every voxel of ``absorb`` becomes ``keep``).

        Returns
        -------
        Edit
            The logged edit.
        """
        keep, absorb = _as_id(keep, "segment to keep"), _as_id(absorb, "segment to merge")
        if keep == absorb:
            raise InputError(f"cannot merge segment {keep} with itself: pick two different segments")
        self.bbox(keep)  # must exist
        lo, hi = self.bbox(absorb)
        arr = self.array
        changes = []
        for idx in _chunk_indices(lo, hi, arr.chunks):
            region = _chunk_region(idx, arr.chunks, arr.shape)
            before = arr[region]
            mask = before == absorb
            if mask.any():
                after = before.copy()
                after[mask] = keep
                changes.append((idx, before, after))
        return self._commit("merge", (keep, absorb), (), changes)

    def split(self, segment, markers, offset=(0, 0, 0)) -> Edit:
        """Split a segment by a seeded watershed from painted seeds.

        Parameters
        ----------
        segment : int
            The segment to split.
        markers : (Z, Y, X) integer array
            Seeds: 0 = none, ``1, 2, …`` = one label per piece. Only seeds on
            voxels of ``segment`` count; at least two labels are needed.
        offset : tuple of 3 int
            Level-0 position of ``markers[0, 0, 0]`` (a seed layer covering
            only the segment's box).

        Returns
        -------
        Edit
            The logged edit; ``new_ids`` are the ids given to the new pieces.
        """
        from skimage.segmentation import watershed

        segment = _as_id(segment, "segment")
        markers = np.asarray(markers)
        if markers.ndim != 3 or markers.dtype.kind not in "uib":
            raise InputError(f"seeds must be a 3-D integer label image, got {markers.ndim}-D {markers.dtype}")
        offset = tuple(int(o) for o in offset)
        if len(offset) != 3:
            raise InputError(f"offset must be (z, y, x), got {offset}")
        lo, hi = self.bbox(segment)
        region = tuple(slice(a, b) for a, b in zip(lo, hi))
        labels = self.array[region]
        mask = labels == segment
        seeds = np.zeros(labels.shape, np.int32)
        src, dst = [], []
        for a, b, o, n in zip(lo, hi, offset, markers.shape):
            s, e = max(a, o), min(b, o + n)
            if e <= s:
                src = None
                break
            src.append(slice(s - o, e - o))
            dst.append(slice(s - a, e - a))
        if src is not None:
            seeds[tuple(dst)] = markers[tuple(src)]
        seeds[~mask] = 0
        values = [int(v) for v in np.unique(seeds) if v != 0]
        if len(values) < 2:
            raise InputError(f"a split needs seeds of at least 2 labels on segment {segment}; "
                             f"found {len(values)} ({', '.join(map(str, values)) or 'none'})")
        boundary = self._boundary_map(region)
        pieces = watershed(boundary, markers=seeds, mask=mask)
        sizes = {v: int(np.count_nonzero(pieces == v)) for v in values}
        keeper = max(values, key=lambda v: (sizes[v], -v))
        new_ids, next_id = [], self._next_id()
        relabelled = labels.copy()
        for v in values:
            if v == keeper:
                continue
            relabelled[pieces == v] = next_id
            new_ids.append(next_id)
            next_id += 1
        arr = self.array
        changes = []
        for idx in _chunk_indices(lo, hi, arr.chunks):
            cregion = _chunk_region(idx, arr.chunks, arr.shape)
            before = arr[cregion]
            after = before.copy()
            inner = tuple(slice(max(c.start, a), min(c.stop, b)) for c, a, b in zip(cregion, lo, hi))
            after[tuple(slice(s.start - c.start, s.stop - c.start) for s, c in zip(inner, cregion))] = \
                relabelled[tuple(slice(s.start - a, s.stop - a) for s, a in zip(inner, lo))]
            if not np.array_equal(before, after):
                changes.append((idx, before, after))
        edit = self._commit("split", (segment,), tuple(new_ids), changes,
                            extra={"seeds": {str(v): sizes[v] for v in values}})
        self._save_state(next_id=next_id)
        return edit

    def _boundary_map(self, region) -> np.ndarray:
        """Boundary probability in [0, 1] over a level-0 region (inverted raw image without one)."""
        if self.boundaries in self.ds:
            b = self.ds.array(self.boundaries, 0)
            if tuple(b.shape) != tuple(self.array.shape):
                raise InputError(f"{self.boundaries} has shape {b.shape}, expected {self.array.shape} like "
                                 f"{self.segmentation}")
            values = np.asarray(b[region], np.float32)
            return values / 255.0 if np.dtype(b.dtype) == np.uint8 else values
        raw = np.asarray(self.ds.raw(0)[region], np.float32)  # membranes are dark in EM
        span = float(raw.max() - raw.min()) or 1.0
        return 1.0 - (raw - float(raw.min())) / span

    def undo(self) -> Edit | None:
        """Undo the last merge or split not yet undone; None when there is nothing to undo."""
        undo, _ = self._stacks()
        if not undo:
            return None
        return self._history("undo", self._entries[undo[-1] - 1])

    def redo(self) -> Edit | None:
        """Redo the last undone edit; None when there is nothing to redo."""
        _, redo = self._stacks()
        if not redo:
            return None
        return self._history("redo", self._entries[redo[-1] - 1])

    def _history(self, op: str, target: Edit) -> Edit:
        record = self._load(target.record)
        expect = "after" if op == "undo" else "before"
        arr = self.array
        for idx, chunk in zip(record["chunk_index"], record[expect]):
            region = _chunk_region(idx, arr.chunks, arr.shape)
            if not np.array_equal(arr[region], chunk):
                raise StoreError(
                    f"cannot {op} edit {target.seq}: {self.segmentation} chunk {tuple(int(i) for i in idx)} "
                    "differs from what the edit log expects (changed outside the log?)")
        edit = Edit(len(self._entries) + 1, op, target.ids, target.new_ids, target.bbox, _now(), self.user,
                    target.seq, target.n_voxels, target.record)
        self._append(edit)
        self._apply(edit)
        return edit

    # ------------------------------------------------------------ commit / apply
    def _commit(self, op: str, ids, new_ids, changes, extra=None) -> Edit:
        if not changes:
            raise InputError(f"{op} of segment(s) {', '.join(map(str, ids))} changes no voxel")
        seq = len(self._entries) + 1
        n_voxels = 0
        lo = np.full(3, np.iinfo(np.int64).max)
        hi = np.zeros(3, np.int64)
        for idx, before, after in changes:
            diff = np.nonzero(before != after)
            n_voxels += diff[0].size
            start = np.array([i * c for i, c in zip(idx, self.array.chunks)])
            lo = np.minimum(lo, start + [d.min() for d in diff])
            hi = np.maximum(hi, start + [d.max() + 1 for d in diff])
        rel = f"{RECORDS}/{seq:06d}.npz"
        path = self.ds.path / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(path.name + f".tmp-{os.getpid()}.npz")
        arrays = {"chunk_index": np.array([c[0] for c in changes], np.int64).reshape(len(changes), 3)}
        for k, (_, before, after) in enumerate(changes):
            arrays[f"before_{k}"] = before
            arrays[f"after_{k}"] = after
        np.savez_compressed(tmp, **arrays)
        replace_durably(tmp, path)
        edit = Edit(seq, op, tuple(int(i) for i in ids), tuple(int(i) for i in new_ids),
                    (tuple(int(v) for v in lo), tuple(int(v) for v in hi)), _now(), self.user, None, int(n_voxels),
                    rel, dict(extra or {}))
        if "token" not in self._state() or self._token() is None:
            self._save_state(token=self._token(create=True))
        self._append(edit)
        self._apply(edit)
        return edit

    def _append(self, edit: Edit) -> None:
        append_line(self.log_path, json.dumps(edit.to_json(), separators=(",", ":")))
        self._entries.append(edit)

    def _apply(self, edit: Edit) -> None:
        self._write(edit)
        self._save_state(applied=edit.seq)
        if self.update_graph:
            self._update_tables([edit])
        self._save_state(tables=edit.seq)

    def _load(self, rel: str) -> dict:
        path = self.ds.path / rel
        if not path.is_file():
            raise StoreError(f"{path}: edit record missing; the edit log cannot be replayed")
        with np.load(path) as f:
            n = f["chunk_index"].shape[0]
            return {"chunk_index": f["chunk_index"], "before": [f[f"before_{k}"] for k in range(n)],
                    "after": [f[f"after_{k}"] for k in range(n)]}

    def _write(self, edit: Edit) -> None:
        """Write the edit's whole chunks into level 0 (idempotent), then refresh the pyramid."""
        record = self._load(edit.record)
        values = record["before"] if edit.op == "undo" else record["after"]
        arr = self.array
        lo = np.full(3, np.iinfo(np.int64).max)
        hi = np.zeros(3, np.int64)
        for idx, chunk in zip(record["chunk_index"], values):
            region = _chunk_region(idx, arr.chunks, arr.shape)
            arr[region] = chunk
            lo = np.minimum(lo, [r.start for r in region])
            hi = np.maximum(hi, [r.stop for r in region])
        self._refresh_pyramid(tuple(int(v) for v in lo), tuple(int(v) for v in hi))

    def _refresh_pyramid(self, lo, hi) -> None:
        """Recompute the coarser levels over the level-0 box ``[lo, hi)`` (nearest: every 2nd voxel)."""
        import zarr

        if not isinstance(self.group, zarr.Group):
            return
        info = read_multiscale(self.group)
        for level in range(1, len(info.paths)):
            f = level_factors(info, level)
            src, dst = self.group[info.paths[level - 1]], self.group[info.paths[level]]
            dlo = tuple(l // k for l, k in zip(lo, f))
            dhi = tuple(min(-(-h // k), s) for h, k, s in zip(hi, f, dst.shape))
            if any(b <= a for a, b in zip(dlo, dhi)):
                break
            block = src[tuple(slice(a * k, b * k) for a, b, k in zip(dlo, dhi, f))]
            dst[tuple(slice(a, b) for a, b in zip(dlo, dhi))] = downsample(block, f, labels=True)
            lo, hi = dlo, dhi

    # ------------------------------------------------------------ graph tables
    def _update_tables(self, edits) -> None:
        from connectome.review._tables import update_graph_tables

        touched = sorted({i for e in edits for i in e.touched})
        lo = tuple(min(e.bbox[0][k] for e in edits) for k in range(3))
        hi = tuple(max(e.bbox[1][k] for e in edits) for k in range(3))
        update_graph_tables(self.ds, self.array, touched, (lo, hi))


def pa_uint(value: int):
    import pyarrow as pa

    return pa.scalar(int(value), pa.uint64())
