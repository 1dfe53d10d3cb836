"""``connectome view``: a viewer with a store's layers and the review widgets, or a picture of it."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from connectome_napari._reader import open_store

WIDGETS = ("curation", "proofreading", "partners", "run")


def _widget_class(name: str):
    from connectome_napari._run import RunWidget
    from connectome_napari._widgets import CurationWidget, PartnersWidget, ProofreadingWidget

    return {"curation": CurationWidget, "proofreading": ProofreadingWidget, "partners": PartnersWidget,
            "run": RunWidget}[name]


def default_widgets(kind: str) -> tuple[str, ...]:
    return ("curation", "run") if kind == "twophoton" else ("proofreading", "partners", "run")


def _go_to_section(viewer, layer, z: float) -> None:
    step = list(viewer.dims.point)
    step[-3] = float(z) * float(layer.scale[-3])
    viewer.dims.point = tuple(step)


def build_viewer(path, *, widgets=None, select: int | None = None, show: bool = True, size=(1500, 950)):
    """Open a store in a new viewer with its review widgets docked.

    Parameters
    ----------
    path : str or Path
        The dataset store.
    widgets : sequence of str, optional
        Among ``curation, proofreading, partners, run``; default by the
        store's kind (two-photon: curation, run; EM: proofreading, partners, run).
    select : int, optional
        A cell (curation) or neuron (partners, proofreading) to select at once.

    Returns
    -------
    (napari.Viewer, dict of str to widget)
    """
    import napari

    from connectome.errors import InputError
    from connectome.io import Dataset

    ds = Dataset(path, mode="r")
    names = tuple(widgets) if widgets else default_widgets(ds.kind)
    unknown = [w for w in names if w not in WIDGETS]
    if unknown:
        raise InputError(f"unknown widget(s) {', '.join(unknown)}: expected {', '.join(WIDGETS)}")
    viewer = napari.Viewer(show=show, title=f"connectome — {Path(path).name}")
    if size:
        viewer.window._qt_window.resize(*size)
    open_store(viewer, path)
    docked = {}
    for name in names:
        w = _widget_class(name)(viewer)
        viewer.window.add_dock_widget(w, name=name, area="right")
        docked[name] = w
    if select is not None:
        select_in(viewer, docked, int(select))
    return viewer, docked


def select_in(viewer, docked: dict, item: int) -> None:
    """Select a cell or neuron in the docked widgets and bring it into view."""
    if "curation" in docked:
        cur = docked["curation"]
        cur.select(item)
        labels = cur.layer
        yx = np.argwhere(np.asarray(labels.data if not labels.multiscale else labels.data[0]) == item)
        if yx.size:
            viewer.camera.center = tuple(float(v) for v in (yx.mean(0) * np.asarray(labels.scale))[-2:])
    partner_widget = docked.get("partners")
    if partner_widget is not None and partner_widget.layer is not None:
        view = partner_widget.show(item)
        c = view.centroids.get(item)
        if c is not None:
            _go_to_section(viewer, partner_widget.layer, round(c[0]))
    proof = docked.get("proofreading")
    if proof is not None and proof.layer is not None:
        proof.segment_a.value = item
        if partner_widget is None:
            lo, hi = proof.proofreader.bbox(item)
            _go_to_section(viewer, proof.layer, (lo[0] + hi[0] - 1) / 2)
            proof.layer.selected_label = item
            proof.layer.show_selected_label = False


def screenshot(path, out, *, widgets=None, select: int | None = None, canvas_only: bool = False,
               size=(1500, 950)) -> np.ndarray:
    """Render a store as the viewer shows it and save a PNG; returns the RGBA image.

    Needs a display (an X server; ``connectome view --screenshot`` starts
    Xvfb itself on a headless machine).
    """
    from qtpy.QtWidgets import QApplication

    viewer, docked = build_viewer(path, widgets=widgets, select=select, show=True, size=size)
    try:
        for _ in range(5):
            QApplication.processEvents()
        for w in docked.values():
            if hasattr(w, "canvas"):
                w.canvas.draw()
        QApplication.processEvents()
        image = viewer.screenshot(str(out), canvas_only=canvas_only, flash=False)
    finally:
        viewer.close()
    return image
