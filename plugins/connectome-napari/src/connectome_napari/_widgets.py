"""Dock widgets: cell curation, proofreading, partners. Views over :mod:`connectome.review`."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from magicgui.widgets import CheckBox, Container, FloatSpinBox, Label, PushButton, Slider, SpinBox

from connectome_napari._reader import PATH_KEY, STORE_KEY, lazy_levels

ROI_LABELS = "twophoton/rois/labels"
SEGMENTATION = "em/segmentation"
TRANSPARENT = (0.0, 0.0, 0.0, 0.0)
ACCEPTED = (0.15, 0.85, 0.25, 1.0)
REJECTED = (0.95, 0.15, 0.15, 1.0)
SELECTED = (1.0, 0.9, 0.0, 1.0)
CONTEXT = (0.55, 0.55, 0.55, 0.25)


def find_layer(viewer, path: str):
    """The layer showing store path ``path`` (the last one opened), or None."""
    found = [layer for layer in viewer.layers if layer.metadata.get(PATH_KEY) == path]
    return found[-1] if found else None


def refresh_layer(layer) -> None:
    """Re-read a store-backed image / labels layer after its arrays changed on disk."""
    store, path = layer.metadata[STORE_KEY], layer.metadata[PATH_KEY]
    from connectome.io import Dataset

    ds = Dataset(store, mode="r")
    node = ds.node(path)
    import zarr

    if isinstance(node, zarr.Group):
        info = ds.multiscale(path)
        paths = [f"{path}/{p}" for p in info.paths]
    else:
        paths = [path]
    levels = lazy_levels(store, paths)
    layer.data = levels if layer.multiscale else levels[0]
    layer.refresh()


def _direct_colormap(colors: dict, default=TRANSPARENT):
    from napari.utils.colormaps import DirectLabelColormap

    mapping = {None: default, 0: TRANSPARENT}
    mapping.update({int(k): tuple(v) for k, v in colors.items()})
    return DirectLabelColormap(color_dict=mapping)


def _value_at(layer, event) -> int:
    value = layer.get_value(event.position, view_direction=event.view_direction,
                            dims_displayed=event.dims_displayed, world=True)
    if isinstance(value, tuple):  # multiscale: (level, value)
        value = value[-1]
    return int(value) if value is not None else 0


class _StoreWidget(Container):
    """A dock widget that follows one store layer (by its store path) in the viewer."""

    layer_path = ""

    def __init__(self, viewer):
        super().__init__(labels=False)
        self.viewer = viewer
        self.layer = None
        self.status = Label(value=f"open a store with {self.layer_path}")
        viewer.layers.events.inserted.connect(self._find)
        viewer.layers.events.removed.connect(self._find)

    def _find(self, event=None) -> None:
        layer = find_layer(self.viewer, self.layer_path)
        if layer is self.layer:
            return
        if self.layer is not None:
            try:
                self.layer.mouse_drag_callbacks.remove(self._on_click)
            except ValueError:
                pass
        self.layer = layer
        if layer is not None:
            layer.mouse_drag_callbacks.append(self._on_click)
            self.attach(layer)

    @property
    def store(self) -> Path | None:
        return Path(self.layer.metadata[STORE_KEY]) if self.layer is not None else None

    def attach(self, layer) -> None:  # pragma: no cover - overridden
        pass

    def _on_click(self, layer, event) -> None:  # pragma: no cover - overridden
        pass


# ---------------------------------------------------------------------------
# cell curation
# ---------------------------------------------------------------------------


class CurationWidget(_StoreWidget):
    """Click a cell to plot its ΔF/F and spikes; accept (a) / reject (r); filter by SNR and area.

    Decisions are written at once to ``twophoton/rois.parquet`` (``accepted``,
    ``curated``) by :class:`connectome.review.Curation`.
    """

    layer_path = ROI_LABELS

    def __init__(self, viewer):
        super().__init__(viewer)
        self.curation = None
        self.roi = 0
        self.min_snr = FloatSpinBox(label="min SNR", value=0.0, min=0.0, max=1e9, step=0.5)
        self.min_area = SpinBox(label="min area (px)", value=0, min=0, max=10**9)
        self.max_area = SpinBox(label="max area (px)", value=10**9, min=0, max=10**9)
        self.accept_button = PushButton(text="Accept (a)")
        self.reject_button = PushButton(text="Reject (r)")
        self.reject_filtered = PushButton(text="Reject every cell outside the filter")
        self.counts = Label(value="")
        filters = Container(widgets=[self.min_snr, self.min_area, self.max_area], labels=True)
        buttons = Container(widgets=[self.accept_button, self.reject_button], layout="horizontal", labels=False)
        self.extend([self.status, buttons, filters, self.reject_filtered, self.counts])
        self.accept_button.changed.connect(lambda: self.decide(True))
        self.reject_button.changed.connect(lambda: self.decide(False))
        self.reject_filtered.changed.connect(self.reject_outside_filter)
        for w in (self.min_snr, self.min_area, self.max_area):
            w.changed.connect(self.recolor)
        from matplotlib.backends.backend_qtagg import FigureCanvasQTAgg
        from matplotlib.figure import Figure

        self.figure = Figure(figsize=(4, 3), tight_layout=True)
        self.ax_dff, self.ax_spikes = self.figure.subplots(2, 1, sharex=True)
        self.canvas = FigureCanvasQTAgg(self.figure)
        self.canvas.setMinimumHeight(240)
        self.native.layout().addWidget(self.canvas)
        self._find()

    def attach(self, layer) -> None:
        from connectome.review import Curation

        self.curation = Curation(self.store)
        layer.bind_key("a", lambda _: self.decide(True), overwrite=True)
        layer.bind_key("r", lambda _: self.decide(False), overwrite=True)
        self.status.value = f"{self.store.name}: click a cell"
        self.recolor()

    def _on_click(self, layer, event) -> None:
        roi = _value_at(layer, event)
        if roi:
            self.select(roi)

    def visible_ids(self) -> np.ndarray:
        """ROIs passing the SNR / area filter."""
        return self.curation.select(min_snr=self.min_snr.value or None, min_area=self.min_area.value or None,
                                    max_area=self.max_area.value)

    def select(self, roi: int) -> None:
        """Show a cell's traces and make it the one that accept / reject act on."""
        self.roi = int(roi)
        tr = self.curation.traces(self.roi)
        for ax, values, title, colour in ((self.ax_dff, tr.dff, "ΔF/F", "tab:green"),
                                          (self.ax_spikes, tr.spikes, "spikes", "black")):
            ax.clear()
            if values is not None:
                ax.plot(tr.time, values, color=colour, lw=0.8)
            ax.set_ylabel(title)
        self.ax_spikes.set_xlabel("time (s)")
        self.ax_dff.set_title(f"ROI {self.roi}")
        self.canvas.draw_idle()
        self._show_status()
        self.recolor()

    def _show_status(self) -> None:
        rows = self.curation.rois
        i = int(np.flatnonzero(self.curation.ids == self.roi)[0])
        acc = rows.column("accepted")[i].as_py()
        cur = rows.column("curated")[i].as_py()
        extra = ", ".join(f"{c} {rows.column(c)[i].as_py():.3g}" for c in ("snr", "area") if c in rows.column_names)
        self.status.value = (f"ROI {self.roi}: {'accepted' if acc else 'rejected'}"
                             f"{' (curated)' if cur else ''}; {extra}")

    def decide(self, accepted: bool) -> None:
        """Accept or reject the selected cell (written to the store at once)."""
        if not self.roi or self.curation is None:
            return
        self.curation.decide(self.roi, accepted=accepted)
        self._show_status()
        self.recolor()

    def reject_outside_filter(self) -> int:
        ids = np.setdiff1d(self.curation.ids, self.visible_ids())
        if ids.size:
            self.curation.decide(ids, accepted=False)
        self.recolor()
        return int(ids.size)

    def colors(self) -> dict:
        """ROI id → colour: accepted green, rejected red, selected yellow; outside the filter hidden."""
        acc = self.curation.accepted()
        shown = set(self.visible_ids().tolist())
        colors = {i: (ACCEPTED if a else REJECTED) if i in shown else TRANSPARENT for i, a in acc.items()}
        if self.roi:
            colors[self.roi] = SELECTED
        return colors

    def recolor(self, *_) -> None:
        if self.layer is None or self.curation is None:
            return
        self.layer.colormap = _direct_colormap(self.colors())
        c = self.curation.counts()
        self.counts.value = (f"{c['accepted']} accepted, {c['rejected']} rejected, {c['curated']} curated "
                             f"of {c['rois']}; {len(self.visible_ids())} pass the filter")


# ---------------------------------------------------------------------------
# proofreading
# ---------------------------------------------------------------------------


class ProofreadingWidget(_StoreWidget):
    """Merge two segments (click A, then B), split one from painted seeds, undo / redo.

    Every edit goes through :class:`connectome.review.Proofreader`: logged in
    ``em/edits.jsonl`` before it is applied; a viewer that crashed replays
    the log when the store is opened again.
    """

    layer_path = SEGMENTATION

    def __init__(self, viewer):
        super().__init__(viewer)
        self.proofreader = None
        self.seeds = None
        self.seed_offset = None
        self.pick = CheckBox(text="pick segments by clicking (A, then B)", value=True)
        self.segment_a = SpinBox(label="segment A (kept / split)", min=0, max=2**62)
        self.segment_b = SpinBox(label="segment B (merged into A)", min=0, max=2**62)
        self.merge_button = PushButton(text="Merge B into A")
        self.split_start = PushButton(text="Paint split seeds on A")
        self.split_button = PushButton(text="Split A (seeded watershed)")
        self.undo_button = PushButton(text="Undo")
        self.redo_button = PushButton(text="Redo")
        self.log = Label(value="")
        ids = Container(widgets=[self.segment_a, self.segment_b], labels=True)
        history = Container(widgets=[self.undo_button, self.redo_button], layout="horizontal", labels=False)
        self.extend([self.status, self.pick, ids, self.merge_button, self.split_start, self.split_button, history,
                     self.log])
        self.merge_button.changed.connect(self.merge)
        self.split_start.changed.connect(self.start_split)
        self.split_button.changed.connect(self.split)
        self.undo_button.changed.connect(self.undo)
        self.redo_button.changed.connect(self.redo)
        self._next = "a"
        self._find()

    def attach(self, layer) -> None:
        from connectome.review import Proofreader

        self.proofreader = Proofreader(self.store)  # replays edits a crashed session left unfinished
        if self.proofreader.replayed:
            refresh_layer(layer)
        replayed = f"; replayed edits {self.proofreader.replayed}" if self.proofreader.replayed else ""
        self.status.value = f"{self.store.name}: {len(self.proofreader.edits)} edits in the log{replayed}"
        self._show_log()

    def _on_click(self, layer, event) -> None:
        if not self.pick.value or "Shift" in getattr(event, "modifiers", ()):
            return
        seg = _value_at(layer, event)
        if not seg:
            return
        if self._next == "a":
            self.segment_a.value, self._next = seg, "b"
        else:
            self.segment_b.value, self._next = seg, "a"

    def _done(self, edit) -> None:
        refresh_layer(self.layer)
        self._show_log()
        self.status.value = (f"{edit.op} {', '.join(map(str, edit.ids))}"
                             f"{' → new ' + ', '.join(map(str, edit.new_ids)) if edit.new_ids else ''}"
                             f" ({edit.n_voxels} voxels)")

    def _show_log(self) -> None:
        lines = [f"{e.seq}. {e.op} {list(e.ids)}{' +' + str(list(e.new_ids)) if e.new_ids else ''} by {e.user}"
                 for e in self.proofreader.edits[-6:]]
        self.log.value = "\n".join(lines)
        self.undo_button.enabled = self.proofreader.can_undo
        self.redo_button.enabled = self.proofreader.can_redo

    def merge(self, *_):
        edit = self.proofreader.merge(self.segment_a.value, self.segment_b.value)
        self._done(edit)
        return edit

    def start_split(self, *_):
        """Add a seed layer over segment A's box: paint label 1 on one part, 2 on the other."""
        lo, hi = self.proofreader.bbox(self.segment_a.value)
        scale = np.asarray(self.layer.scale)
        if self.seeds is not None and self.seeds in self.viewer.layers:
            self.viewer.layers.remove(self.seeds)
        self.seeds = self.viewer.add_labels(np.zeros(tuple(h - l for l, h in zip(lo, hi)), np.uint8),
                                            name=f"split seeds (segment {self.segment_a.value})", scale=scale,
                                            translate=np.asarray(lo) * scale, opacity=0.9)
        self.seeds.selected_label = 1
        self.seeds.mode = "paint"
        self.seed_offset = lo
        self.status.value = "paint seeds: label 1 on one part, 2 on the other, then Split"
        return self.seeds

    def split(self, *_):
        if self.seeds is None:
            self.start_split()
            return None
        edit = self.proofreader.split(self.segment_a.value, np.asarray(self.seeds.data), offset=self.seed_offset)
        if self.seeds in self.viewer.layers:
            self.viewer.layers.remove(self.seeds)
        self.seeds = None
        self.viewer.layers.selection.active = self.layer
        self._done(edit)
        return edit

    def undo(self, *_):
        edit = self.proofreader.undo()
        if edit is not None:
            self._done(edit)
        return edit

    def redo(self, *_):
        edit = self.proofreader.redo()
        if edit is not None:
            self._done(edit)
        return edit


# ---------------------------------------------------------------------------
# partners
# ---------------------------------------------------------------------------


class PartnersWidget(_StoreWidget):
    """Select a neuron: its inputs (blue) and outputs (red) coloured by synapse count, in a table.

    Click a row to jump to that partner. Functional partners (co-registered
    cells correlated in activity) are listed too where the store has them.
    """

    layer_path = SEGMENTATION
    COLUMNS = ("direction", "neuron", "synapses", "ROI", "r")

    def __init__(self, viewer):
        super().__init__(viewer)
        from qtpy.QtWidgets import QAbstractItemView, QTableWidget

        self.view = None
        self.highlighted: dict = {}
        self._original = None
        self.pick = CheckBox(text="select a neuron by clicking", value=True)
        self.neuron = SpinBox(label="neuron", min=0, max=2**62)
        self.min_synapses = Slider(label="min synapses", value=1, min=1, max=20)
        self.show_button = PushButton(text="Show partners")
        self.clear_button = PushButton(text="Clear")
        form = Container(widgets=[self.neuron, self.min_synapses], labels=True)
        buttons = Container(widgets=[self.show_button, self.clear_button], layout="horizontal", labels=False)
        self.extend([self.status, self.pick, form, buttons])
        self.table = QTableWidget(0, len(self.COLUMNS))
        self.table.setHorizontalHeaderLabels(list(self.COLUMNS))
        self.table.setEditTriggers(QAbstractItemView.EditTrigger.NoEditTriggers)
        self.table.setSelectionBehavior(QAbstractItemView.SelectionBehavior.SelectRows)
        self.table.cellClicked.connect(lambda row, _col: self.jump(row))
        self.table.setMinimumHeight(220)
        self.native.layout().addWidget(self.table)
        self.show_button.changed.connect(lambda: self.show(self.neuron.value))
        self.clear_button.changed.connect(self.clear)
        self.min_synapses.changed.connect(lambda: self.view is not None and self.show(self.view.neuron_id))
        self._find()

    def attach(self, layer) -> None:
        self._original = layer.colormap
        self.status.value = f"{self.store.name}: click a neuron"

    def _on_click(self, layer, event) -> None:
        if not self.pick.value:
            return
        nid = _value_at(layer, event)
        if nid:
            self.neuron.value = nid
            self.show(nid)

    def show(self, neuron_id: int):
        """Highlight a neuron's partners and list them."""
        from connectome.review import partners

        view = partners(self.store, int(neuron_id), min_synapses=int(self.min_synapses.value))
        self.view = view
        if self.neuron.value != int(neuron_id):
            with self.neuron.changed.blocked():
                self.neuron.value = int(neuron_id)
        self.highlighted = view.colors()
        self.layer.colormap = _direct_colormap(self.highlighted, default=CONTEXT)
        self.layer.selected_label = int(neuron_id)
        self._fill(view.rows())
        n_up, n_down = len(view.upstream["neuron_id"]), len(view.downstream["neuron_id"])
        self.status.value = (f"neuron {view.neuron_id}: {n_up} upstream (blue), {n_down} downstream (red)"
                             f" with ≥ {view.min_synapses} synapses")
        return view

    def _fill(self, rows) -> None:
        from qtpy.QtWidgets import QTableWidgetItem

        self.rows = rows
        self.table.setRowCount(len(rows))
        for i, r in enumerate(rows):
            values = (r["direction"], r["neuron_id"] or "", r["n_synapses"] or "", r.get("roi_id", ""),
                      f"{r['correlation']:.2f}" if "correlation" in r else "")
            for j, v in enumerate(values):
                self.table.setItem(i, j, QTableWidgetItem(str(v)))

    def jump(self, row: int) -> None:
        """Centre the view on the partner in table row ``row``."""
        r = self.rows[row]
        if not np.all(np.isfinite([r["z"], r["y"], r["x"]])):
            return
        world = np.asarray([r["z"], r["y"], r["x"]]) * np.asarray(self.layer.scale)[-3:]
        step = list(self.viewer.dims.point)
        step[-3] = float(world[0])
        self.viewer.dims.point = tuple(step)
        self.viewer.camera.center = tuple(float(v) for v in world[-2:])
        self.status.value = f"partner {r['neuron_id']} ({r['direction']})"

    def clear(self, *_) -> None:
        if self.layer is not None and self._original is not None:
            self.layer.colormap = self._original
        self.highlighted, self.view = {}, None
        self.table.setRowCount(0)
