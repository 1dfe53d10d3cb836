"""Cell curation: accept or reject two-photon ROIs, with their traces.

Decisions go into ``twophoton/rois.parquet``: ``accepted`` (bool) and
``curated`` (True for rows a person decided). The extraction stage keeps
``accepted`` where ``curated`` is True, so re-running it never undoes a
decision. Every decision re-reads the table, changes the rows and writes
it back atomically and durably (temporary file, fsync, rename): a crash
leaves either the old or the new table, never a torn one.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pyarrow as pa

from connectome.errors import InputError, StageError, StoreError
from connectome.io import Dataset
from connectome.review._atomic import write_parquet

ROIS = "twophoton/rois"
LABELS = "twophoton/rois/labels"
DFF = "twophoton/traces/dff"
SPIKES = "twophoton/traces/spikes"


@dataclass(frozen=True)
class Traces:
    """The traces of one ROI.

    Attributes
    ----------
    roi_id : int
    time : (T,) float64 array
        Seconds from the first frame (frame index where the frame rate is unknown).
    dff : (T,) float32 array or None
        ΔF/F, or None where ``twophoton/traces/dff`` does not exist.
    spikes : (T,) float32 array or None
        Inferred spike rate, or None where ``twophoton/traces/spikes`` does not exist.
    """

    roi_id: int
    time: np.ndarray
    dff: np.ndarray | None
    spikes: np.ndarray | None


class Curation:
    """Accept / reject decisions on the ROIs of a two-photon store.

    Parameters
    ----------
    dataset : str, Path or Dataset
        A store with ``twophoton/rois.parquet`` (``roi_id`` and, for
        filtering, ``snr`` and ``area``); traces and labels are optional.

    Examples
    --------
    >>> cur = Curation("twophoton.zarr")                  # doctest: +SKIP
    >>> cur.decide([3, 7], accepted=False)                  # doctest: +SKIP
    >>> cur.traces(3).dff.shape                             # doctest: +SKIP
    """

    def __init__(self, dataset):
        self.ds = dataset if isinstance(dataset, Dataset) else Dataset(dataset)
        if not self.ds.has_table(ROIS):
            raise StageError(f"{self.ds.path}: no {ROIS}.parquet to curate; run ROI detection first")
        self.reload()

    def reload(self) -> pa.Table:
        """Read the ROI table again (another process may have rewritten it)."""
        table = self.ds.read_table(ROIS)
        if "roi_id" not in table.column_names:
            raise StoreError(f"{self.ds.table_path(ROIS)}: no roi_id column (has {', '.join(table.column_names)})")
        n = table.num_rows
        if "accepted" not in table.column_names:
            table = table.append_column("accepted", pa.array(np.ones(n, bool)))
        if "curated" not in table.column_names:
            table = table.append_column("curated", pa.array(np.zeros(n, bool)))
        self._table = table
        return table

    @property
    def rois(self) -> pa.Table:
        """The ROI table with ``accepted`` and ``curated`` columns."""
        return self._table

    @property
    def ids(self) -> np.ndarray:
        return self._table.column("roi_id").to_numpy().astype(np.int64)

    def _column(self, name: str) -> np.ndarray:
        col = self._table.column(name)
        return col.to_numpy(zero_copy_only=False)

    def accepted(self) -> dict[int, bool]:
        """``roi_id -> accepted``."""
        return dict(zip(self.ids.tolist(), self._column("accepted").astype(bool).tolist()))

    def counts(self) -> dict:
        acc = self._column("accepted").astype(bool)
        cur = self._column("curated").astype(bool)
        return {"rois": int(acc.size), "accepted": int(acc.sum()), "rejected": int((~acc).sum()),
                "curated": int(cur.sum())}

    def decide(self, roi_ids, accepted: bool) -> int:
        """Accept (``accepted=True``) or reject ROIs and write the table.

        Returns
        -------
        int
            Number of rows written.
        """
        ids = np.atleast_1d(np.asarray(roi_ids, dtype=np.int64))
        table = self.reload()
        all_ids = self.ids
        unknown = np.setdiff1d(ids, all_ids)
        if unknown.size:
            raise InputError(f"unknown ROI id(s) {', '.join(map(str, unknown[:5].tolist()))}: "
                             f"the table has {all_ids.size} ROIs with ids {all_ids.min(initial=0)}…{all_ids.max(initial=0)}")
        rows = np.isin(all_ids, ids)
        acc = self._column("accepted").astype(bool).copy()
        cur = self._column("curated").astype(bool).copy()
        acc[rows] = bool(accepted)
        cur[rows] = True
        for name, values in (("accepted", acc), ("curated", cur)):
            table = table.set_column(table.schema.get_field_index(name), name, pa.array(values))
        write_parquet(self.ds.table_path(ROIS), table)
        self._table = table
        return int(rows.sum())

    def select(self, *, min_snr: float | None = None, min_area: float | None = None,
               max_area: float | None = None, accepted: bool | None = None) -> np.ndarray:
        """Ids of ROIs passing the filters (``snr ≥ min_snr``, ``min_area ≤ area ≤ max_area``)."""
        keep = np.ones(self._table.num_rows, bool)
        for name, bound, op in (("snr", min_snr, np.greater_equal), ("area", min_area, np.greater_equal),
                                ("area", max_area, np.less_equal)):
            if bound is None:
                continue
            if name not in self._table.column_names:
                raise StoreError(f"{self.ds.table_path(ROIS)}: no {name} column to filter on")
            values = self._column(name).astype(np.float64)
            keep &= op(values, float(bound))
        if accepted is not None:
            keep &= self._column("accepted").astype(bool) == bool(accepted)
        return self.ids[keep]

    def traces(self, roi_id) -> Traces:
        """ΔF/F and spikes of one ROI (row ``roi_id - 1`` of the trace arrays), read alone."""
        roi_id = int(roi_id)
        if roi_id not in set(self.ids.tolist()):
            raise InputError(f"unknown ROI id {roi_id}")
        out, T = {}, None
        for key, name in (("dff", DFF), ("spikes", SPIKES)):
            if name in self.ds:
                arr = self.ds.array(name)
                if arr.ndim != 2 or roi_id - 1 >= arr.shape[0]:
                    raise StoreError(f"{self.ds.path}/{name}: shape {arr.shape} has no row for ROI {roi_id}")
                out[key] = np.asarray(arr[roi_id - 1], np.float32)
                T = arr.shape[1]
            else:
                out[key] = None
        T = T or 0
        rate = None
        try:
            rate = self.ds.frame_rate
        except StoreError:
            pass
        time = np.arange(T, dtype=np.float64) / rate if rate else np.arange(T, dtype=np.float64)
        return Traces(roi_id, time, out["dff"], out["spikes"])

    def roi_at(self, position) -> int:
        """ROI id under a spatial position ``(y, x)`` or ``(z, y, x)`` of ``twophoton/rois/labels`` (0 = none)."""
        if LABELS not in self.ds:
            raise StageError(f"{self.ds.path}: no {LABELS}")
        arr = self.ds.array(LABELS)
        p = tuple(int(np.floor(float(v) + 0.5)) for v in position)[-arr.ndim:]
        if len(p) != arr.ndim or any(v < 0 or v >= s for v, s in zip(p, arr.shape)):
            return 0
        return int(arr[p])
