"""The napari plugin in a real viewer (Xvfb via pytest-xvfb; offscreen Qt has no OpenGL here).

Skipped only where napari or the plugin is not installed:
``pip install -e "plugins/connectome-napari[test]"``.
"""

from __future__ import annotations

import json
import shutil
import time
from types import SimpleNamespace

import numpy as np
import pytest

napari = pytest.importorskip("napari", reason="napari is not installed (pip install -e 'plugins/connectome-napari[test]')")
pytest.importorskip("connectome_napari", reason="the plugin is not installed (pip install -e 'plugins/connectome-napari[test]')")
pytest.importorskip("pytestqt", reason="pytest-qt is not installed")

from connectome.errors import InputError  # noqa: E402
from connectome.graph import _store as st  # noqa: E402
from connectome.io import Dataset, axes_for, create_multiscale  # noqa: E402
from connectome.review import Curation, Proofreader  # noqa: E402
from connectome.review._sample import sample_em, sample_twophoton  # noqa: E402
from connectome_napari import napari_get_reader  # noqa: E402
from connectome_napari._reader import open_store  # noqa: E402
from connectome_napari._run import RunWidget, StageCancelled  # noqa: E402
from connectome_napari._widgets import CurationWidget, PartnersWidget, ProofreadingWidget  # noqa: E402

pytestmark = [
    # third-party warnings we cannot fix (raised inside napari / vispy / pint / magicgui on Qt 6):
    pytest.mark.filterwarnings("ignore:.*Inconsistent units across layers.*"),
    pytest.mark.filterwarnings("ignore::FutureWarning:napari"),
    pytest.mark.filterwarnings("ignore::FutureWarning:vispy"),
    pytest.mark.filterwarnings("ignore:.*is deprecated.*:UserWarning:napari"),
    pytest.mark.filterwarnings("ignore::RuntimeWarning:vispy"),
]


# ---------------------------------------------------------------- stores
@pytest.fixture(scope="module")
def em_store(tmp_path_factory):
    path = tmp_path_factory.mktemp("plugin") / "em.zarr"
    ds, truth = sample_em(path, seed=1)
    return path, truth


@pytest.fixture
def em(em_store, tmp_path):
    path, truth = em_store
    dst = tmp_path / "em.zarr"
    shutil.copytree(path, dst)
    return dst, truth


@pytest.fixture(scope="module")
def tp_store(tmp_path_factory):
    path = tmp_path_factory.mktemp("plugin") / "tp.zarr"
    sample_twophoton(path, shape=(100, 64, 64), seed=3)
    return path


@pytest.fixture
def tp(tp_store, tmp_path):
    dst = tmp_path / "tp.zarr"
    shutil.copytree(tp_store, dst)
    return dst


def touching_pair(labels):
    a, b = labels[:, :, :-1].ravel(), labels[:, :, 1:].ravel()
    diff = a != b
    pairs, counts = np.unique(np.stack([np.minimum(a[diff], b[diff]), np.maximum(a[diff], b[diff])]), axis=1,
                              return_counts=True)
    k = int(np.argmax(counts))
    return int(pairs[0, k]), int(pairs[1, k])


def click(widget, layer, voxel):
    """A mouse press on ``voxel`` (level-0 index) of ``layer``, as napari delivers it (on the shown slice)."""
    world = np.asarray(voxel, float) * np.asarray(layer.scale)
    viewer = widget.viewer
    if layer.ndim == 3:
        point = list(viewer.dims.point)
        point[-3] = float(world[0])
        viewer.dims.point = tuple(point)
    event = SimpleNamespace(position=tuple(world), view_direction=None, dims_displayed=[layer.ndim - 2, layer.ndim - 1],
                            modifiers=(), type="mouse_press")
    widget._on_click(layer, event)


def level0(layer) -> np.ndarray:
    return np.asarray(layer.data[0] if layer.multiscale else layer.data)


# ---------------------------------------------------------------- reader
def test_reader_declines_other_paths(tmp_path, em):
    assert napari_get_reader(str(tmp_path / "image.tif")) is None
    assert napari_get_reader(str(tmp_path)) is None
    assert napari_get_reader([str(em[0]), str(em[0])]) is None
    assert napari_get_reader(str(em[0])) is not None


def test_reader_opens_em_store(make_napari_viewer, em):
    path, truth = em
    viewer = make_napari_viewer(show=True)
    viewer.open(str(path), plugin="connectome-napari")
    kinds = {layer.name: type(layer).__name__ for layer in viewer.layers}
    assert kinds == {"raw": "Image", "em/boundaries": "Image", "em/segmentation": "Labels", "em/synapses": "Points",
                     "em/synapses pre→post": "Vectors"}
    seg = viewer.layers["em/segmentation"]
    assert tuple(seg.scale) == (40.0, 8.0, 8.0) and str(seg.units[0]) == "nanometer"
    assert type(seg.data).__module__.startswith("dask")  # lazy
    np.testing.assert_array_equal(level0(seg), truth.labels)
    n_syn = Dataset(path).read_table(st.SYNAPSES).num_rows
    assert len(viewer.layers["em/synapses"].data) == n_syn
    image = viewer.screenshot(canvas_only=True, flash=False)
    assert image[..., :3].std() > 20  # the data, not an empty canvas


def test_reader_opens_twophoton_store(make_napari_viewer, tp):
    viewer = make_napari_viewer(show=True)
    viewer.open(str(tp), plugin="connectome-napari")
    assert type(viewer.layers["raw"]).__name__ == "Image"
    assert type(viewer.layers["twophoton/rois/labels"]).__name__ == "Labels"
    np.testing.assert_allclose(viewer.layers["raw"].scale, (1 / 15, 1.0, 1.0))
    assert tuple(viewer.layers["twophoton/summary/correlation"].scale) == (1.0, 1.0)


def test_reader_huge_volume_opens_at_once(make_napari_viewer, tmp_path):
    """A 550 GB EM volume (chunks never written) opens lazily in seconds, at the coarsest level."""
    ds = Dataset.create(tmp_path / "huge.zarr")
    shape = (1024, 24576, 24576)
    create_multiscale(ds.root, "raw", shape=shape, dtype="uint8", chunks=(32, 512, 512), axes=axes_for("em", 3),
                      scale=(30, 4, 4))
    ds.root.attrs["connectome"] = {"kind": "em"}
    viewer = make_napari_viewer(show=True)
    t0 = time.perf_counter()
    viewer.open(str(ds.path), plugin="connectome-napari")
    assert time.perf_counter() - t0 < 15
    raw = viewer.layers["raw"]
    assert raw.multiscale and raw.data[0].shape == shape


# ---------------------------------------------------------------- curation
def test_curation_widget(make_napari_viewer, tp):
    viewer = make_napari_viewer(show=True)
    open_store(viewer, tp)
    w = CurationWidget(viewer)
    viewer.window.add_dock_widget(w)
    layer = viewer.layers["twophoton/rois/labels"]
    labels = np.asarray(layer.data)
    cur = Curation(tp)
    active = int(cur.ids[np.argmax(cur.rois.column("snr").to_numpy())])
    y, x = np.argwhere(labels == active)[0]
    click(w, layer, (y, x))
    assert w.roi == active
    dff = Dataset(tp).array("twophoton/traces/dff")[active - 1]
    np.testing.assert_array_equal(w.ax_dff.lines[0].get_ydata(), dff)
    assert len(w.ax_spikes.lines) == 1
    w.reject_button.native.click()  # button
    assert Curation(tp).accepted()[active] is False
    viewer.layers.selection.active = layer
    viewer.window._qt_viewer.canvas._key_map_handler.press_key("a")  # key
    viewer.window._qt_viewer.canvas._key_map_handler.release_key("a")
    t = Dataset(tp).read_table("twophoton/rois")
    row = t.column("roi_id").to_pylist().index(active)
    assert t.column("accepted")[row].as_py() is True and t.column("curated")[row].as_py() is True
    # filter: cells under the SNR cut are hidden, and can be rejected in one go
    snr = cur.rois.column("snr").to_numpy()
    cut = float(np.sort(snr)[len(snr) // 2])
    w.min_snr.value = cut
    hidden = set(cur.ids[snr < w.min_snr.value].tolist())  # the spin box rounds the cut
    assert 0 < len(hidden) < len(snr)
    colors = w.colors()
    assert {i for i, c in colors.items() if c[3] == 0} == hidden
    assert layer.colormap.map(np.array([min(hidden)]))[0][3] == 0
    assert w.reject_outside_filter() == len(hidden)
    acc = Curation(tp).accepted()
    assert all(acc[i] is False for i in hidden)


# ---------------------------------------------------------------- proofreading
def test_proofreading_merge_split_undo(make_napari_viewer, em):
    path, truth = em
    a, b = touching_pair(truth.labels)
    viewer = make_napari_viewer(show=True)
    open_store(viewer, path)
    w = ProofreadingWidget(viewer)
    viewer.window.add_dock_widget(w)
    seg = viewer.layers["em/segmentation"]
    click(w, seg, np.argwhere(truth.labels == a)[0])
    click(w, seg, np.argwhere(truth.labels == b)[0])
    assert (w.segment_a.value, w.segment_b.value) == (a, b)
    w.merge_button.native.click()
    merged = np.where(truth.labels == b, a, truth.labels)
    np.testing.assert_array_equal(level0(seg), merged)
    log = [json.loads(x) for x in (path / "em/edits.jsonl").read_text().splitlines()]
    assert log[-1]["op"] == "merge" and log[-1]["ids"] == [a, b]
    # split A back from painted seeds
    w.split_start.native.click()
    seeds = w.seeds
    assert seeds is not None and seeds in viewer.layers
    lo = np.asarray(w.seed_offset)
    for value, neuron in ((1, a), (2, b)):
        inside = (truth.labels == neuron) & ~truth.boundaries
        for z in range(0, truth.labels.shape[0], 8):
            pts = np.argwhere(inside[z])
            if len(pts):
                p = pts[np.argmin(((pts - pts.mean(0)) ** 2).sum(1))]
                seeds.paint((z - lo[0], p[0] - lo[1], p[1] - lo[2]), value, refresh=False)
    w.split_button.native.click()
    assert seeds not in viewer.layers
    after = level0(seg)
    edit = w.proofreader.edits[-1]
    assert edit.op == "split" and len(edit.new_ids) == 1
    both = (truth.labels == a) | (truth.labels == b)
    assert set(np.unique(after[both]).tolist()) == {a, edit.new_ids[0]}
    np.testing.assert_array_equal(after[~both], truth.labels[~both])
    # undo twice: exactly the original segmentation
    w.undo_button.native.click()
    np.testing.assert_array_equal(level0(seg), merged)
    w.undo_button.native.click()
    np.testing.assert_array_equal(level0(seg), truth.labels)
    w.redo_button.native.click()
    np.testing.assert_array_equal(level0(seg), merged)
    ops = [json.loads(x)["op"] for x in (path / "em/edits.jsonl").read_text().splitlines()]
    assert ops == ["merge", "split", "undo", "undo", "redo"]


def test_viewer_restart_replays_log(make_napari_viewer, em, monkeypatch):
    """A viewer dies mid-merge (log written, chunks not): the next viewer finishes the edit."""
    path, truth = em
    a, b = touching_pair(truth.labels)
    pr = Proofreader(path)
    monkeypatch.setattr(Proofreader, "_write", lambda self, edit: (_ for _ in ()).throw(RuntimeError("crash")))
    with pytest.raises(RuntimeError):
        pr.merge(a, b)
    monkeypatch.undo()
    np.testing.assert_array_equal(Dataset(path).array("em/segmentation")[...], truth.labels)  # not applied yet
    viewer = make_napari_viewer(show=True)
    open_store(viewer, path)
    w = ProofreadingWidget(viewer)
    assert w.proofreader.replayed == [1] and "replayed" in w.status.value
    np.testing.assert_array_equal(level0(viewer.layers["em/segmentation"]), np.where(truth.labels == b, a, truth.labels))


# ---------------------------------------------------------------- partners
def test_partners_widget(make_napari_viewer, em):
    path, truth = em
    edges = truth.edges()
    hub = int(np.bincount(np.concatenate([edges["pre_id"], edges["post_id"]]).astype(int)).argmax())
    viewer = make_napari_viewer(show=True)
    open_store(viewer, path)
    w = PartnersWidget(viewer)
    viewer.window.add_dock_widget(w)
    seg = viewer.layers["em/segmentation"]
    click(w, seg, np.argwhere(truth.labels == hub)[0])
    up = set(edges["pre_id"][edges["post_id"] == hub].tolist())
    down = set(edges["post_id"][edges["pre_id"] == hub].tolist())
    assert w.view.neuron_id == hub
    assert set(w.highlighted) == {hub} | up | down
    for i in up - down:
        assert w.highlighted[i][2] > 0.9  # inputs blue
    for i in down - up:
        assert w.highlighted[i][0] > 0.8 and w.highlighted[i][2] < 0.6  # outputs red
    shown = seg.colormap.map(np.array([hub, *sorted(up | down)], np.uint64))
    np.testing.assert_allclose(shown[0], (1.0, 0.9, 0.0, 1.0), atol=0.01)
    assert w.table.rowCount() == len(up) + len(down)
    w.jump(0)
    partner = w.rows[0]["neuron_id"]
    n = Dataset(path).read_table(st.NEURONS).to_pydict()
    k = n["neuron_id"].index(partner)
    np.testing.assert_allclose(viewer.camera.center[-2:], (n["y"][k] * 8.0, n["x"][k] * 8.0), atol=1e-6)
    assert abs(viewer.dims.point[0] - n["z"][k] * 40.0) <= 20.0  # the section holding the centroid
    w.min_synapses.value = 2  # every synthetic edge has one synapse: nothing left
    assert w.table.rowCount() == 0 and set(w.highlighted) == {hub}


# ---------------------------------------------------------------- run widgets
def _wait(qtbot, w, timeout=60_000):
    qtbot.waitUntil(lambda: w.worker is None, timeout=timeout)


def test_run_widget_twophoton(make_napari_viewer, qtbot, tmp_path):
    from connectome.synth.twophoton import make_movie

    movie, _ = make_movie((60, 48, 48), frame_rate=15.0, motion="rigid", seed=2)
    ds = Dataset.create(tmp_path / "raw.zarr")
    ds.write_raw(movie, kind="twophoton", scale=(1 / 15, 1.0, 1.0), chunks=(20, 48, 48))
    viewer = make_napari_viewer(show=True)
    open_store(viewer, ds.path)
    w = RunWidget(viewer)
    viewer.window.add_dock_widget(w)
    assert w.kind == "twophoton" and list(w.stages.value) == ["registration", "summary"]
    next(x for x in w.params if x.name == "registration__n_reference_frames").value = "30"
    assert w.config() == {"registration": {"n_reference_frames": 30}}
    seen = []
    w._progress = (lambda f: lambda item: (seen.append(item), f(item)))(w._progress)
    w.run_button.native.click()
    _wait(qtbot, w)
    assert w.error is None, w.error
    names = {layer.name for layer in viewer.layers}
    assert {"twophoton/registered", "twophoton/summary/mean", "twophoton/summary/correlation"} <= names
    assert Dataset(ds.path).provenance.is_done("twophoton.registration")
    assert any(done == total for _name, done, total in seen)  # the progress bar reached its end


def test_run_widget_em_cancel_then_resume(make_napari_viewer, qtbot, tmp_path):
    from connectome.synth.em import make_volume

    image, _ = make_volume((16, 64, 64), voxel_size=(40, 8, 8), seed=4)
    ds = Dataset.create(tmp_path / "em.zarr")
    ds.write_raw(image, kind="em", scale=(40, 8, 8), chunks=(8, 32, 32))
    viewer = make_napari_viewer(show=True)
    open_store(viewer, ds.path)
    w = RunWidget(viewer)
    w.stages.value = ["boundaries"]
    for name, value in (("em__block_shape", "(8, 32, 32)"), ("em__chunks", "(8, 32, 32)")):
        next(x for x in w.params if x.name == name).value = value
    w._progress = (lambda f: lambda item: (w.cancel_event.set(), f(item)))(w._progress)  # cancel at once
    import dask

    with dask.config.set(num_workers=2):  # waves of 2 blocks: the cancel lands after the first wave
        w.run()
        _wait(qtbot, w)
    assert isinstance(w.error, StageCancelled)
    assert not Dataset(ds.path).is_complete("em/boundaries")
    done_before = int(np.count_nonzero(Dataset(ds.path).root["_progress/em.boundaries"][...]))
    assert 1 <= done_before < 8
    w._progress = RunWidget._progress.__get__(w)
    w.run()
    _wait(qtbot, w)
    assert w.error is None, w.error
    assert Dataset(ds.path).is_complete("em/boundaries")
    assert "em/boundaries" in {layer.name for layer in viewer.layers}


# ---------------------------------------------------------------- screenshots
def test_screenshot_shows_the_data(qtbot, em, tmp_path):
    from connectome_napari._view import screenshot

    path, truth = em
    out = tmp_path / "shot.png"
    image = screenshot(path, out, widgets=["partners"], select=int(truth.labels[12, 48, 48]), canvas_only=True,
                       size=(900, 700))
    assert out.is_file() and image.ndim == 3
    rgb = image[..., :3].reshape(-1, 3).astype(int)
    assert rgb.std() > 20
    yellow = np.all(np.abs(rgb - [255, 230, 0]) < 90, axis=1) & (rgb[:, 2] < 120)
    assert yellow.mean() > 0.002  # the selected neuron is drawn in its highlight colour
    with pytest.raises(InputError, match="unknown widget"):
        screenshot(path, out, widgets=["nope"])
