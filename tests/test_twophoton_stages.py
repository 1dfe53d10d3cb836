"""The spikes and functional stages over a store: accuracy, resume, invalidation, errors."""

import numpy as np
import pytest

from connectome.errors import InputError, StageError
from connectome.io import Dataset
from connectome.metrics import binned_correlation
from connectome.synth.twophoton import iter_movie
from workflows.twophoton import (FunctionalConfig, SpikesConfig, run_functional, run_spikes, run_twophoton)

FS = 15.0


def dff_store(tmp_path, n_cells=40, frames=3600, seed=3, name="s.zarr"):
    """A store holding only what the two stages read: raw (for the frame rate), ΔF/F
    traces made from the synthetic truth with 5 % noise, and the ROI table."""
    truth, _ = iter_movie((frames, 64, 64), frame_rate=FS, n_cells=n_cells, seed=seed)
    rng = np.random.default_rng(seed)
    dff = (truth.calcium + rng.normal(0, 0.05, truth.calcium.shape)).astype(np.float32)
    ds = Dataset.create(tmp_path / name)
    ds.write_raw(np.zeros((frames, 4, 4), np.uint16), kind="twophoton", scale=(1 / FS, 1, 1))
    ds.create_output("twophoton/traces/dff", shape=dff.shape, dtype="float32", chunks=(16, frames),
                     stage="twophoton.extraction")
    ds.array("twophoton/traces/dff")[...] = dff
    ds.mark_complete("twophoton/traces/dff")
    n = dff.shape[0]
    accepted = np.ones(n, bool)
    accepted[-3:] = False
    ds.write_table("twophoton/rois", {"roi_id": np.arange(1, n + 1), "accepted": accepted})
    return ds, truth


def test_spikes_stage_recovers_spikes_and_resumes(tmp_path, monkeypatch):
    ds, truth = dff_store(tmp_path)
    m = run_spikes(ds, config=SpikesConfig(rows_per_block=7), show_progress=False)
    spikes = ds.array("twophoton/traces/spikes")[...]
    assert spikes.shape == truth.spikes.shape and spikes.dtype == np.float32 and spikes.min() >= 0
    active = np.flatnonzero(truth.spikes.sum(axis=1) >= 3)
    r = [binned_correlation(spikes[i], truth.spikes[i], frame_rate=FS, bin_seconds=0.04) for i in active]
    # the bar for the synthetic data: median spike correlation (40 ms bins) >= 0.7
    assert np.median(r) >= 0.7, np.median(r)
    assert m["n_rois"] == truth.spikes.shape[0]
    assert ds.provenance.get("twophoton.spikes")["resumed"] is False  # a first run is not a resumed one

    # an interrupted run resumes and ends identical to the uninterrupted one
    import workflows.twophoton as w

    ds2, _ = dff_store(tmp_path, name="r.zarr")
    real, calls = w._spikes_block, []

    def flaky(traces, frame_rate, **kw):
        calls.append(1)
        if len(calls) == 3:
            raise RuntimeError("simulated crash")
        return real(traces, frame_rate, **kw)

    monkeypatch.setattr(w, "_spikes_block", flaky)
    with pytest.raises(Exception, match="simulated crash"):
        run_spikes(ds2, config=SpikesConfig(rows_per_block=7), show_progress=False)
    assert not ds2.is_complete("twophoton/traces/spikes")
    monkeypatch.setattr(w, "_spikes_block", real)
    run_spikes(ds2, config=SpikesConfig(rows_per_block=7), show_progress=False)
    np.testing.assert_array_equal(ds2.array("twophoton/traces/spikes")[...], spikes)


def test_functional_stage_links_ensembles_of_accepted_rois(tmp_path):
    ds, truth = dff_store(tmp_path)
    run_spikes(ds, show_progress=False)
    m = run_functional(ds, config=FunctionalConfig(source="spikes"))
    e = ds.read_table("graph/functional_edges").to_pydict()
    found = set(zip(e["roi_a"], e["roi_b"]))
    ens, n = truth.ensemble, len(truth.ensemble)
    accepted = set(range(1, n - 2))  # the last three ROIs are rejected in the table
    same = {(i + 1, j + 1) for i in range(n) for j in range(i + 1, n)
            if ens[i] >= 0 and ens[i] == ens[j] and i + 1 in accepted and j + 1 in accepted}
    assert len(same) >= 10
    precision = len(found & same) / max(len(found), 1)
    recall = len(found & same) / len(same)
    assert precision >= 0.9 and recall >= 0.9, (precision, recall)
    assert all(a in accepted and b in accepted for a, b in found)
    assert m["n_rois"] == n - 3 and m["n_edges"] == len(found)


def test_recomputed_stage_makes_later_stages_stale(tmp_path):
    ds, _ = dff_store(tmp_path, n_cells=12, frames=900)
    run_twophoton(ds, ["spikes", "functional"], config={"functional": {"n_surrogates": 50}}, show_progress=False)
    assert ds.provenance.get("twophoton.functional")["status"] == "done"
    first = ds.provenance.get("twophoton.functional")["finished"]
    # re-running finished stages is a no-op
    run_twophoton(ds, ["spikes", "functional"], config={"functional": {"n_surrogates": 50}}, show_progress=False)
    assert ds.provenance.get("twophoton.functional")["finished"] == first
    # recomputing spikes alone leaves functional marked stale, and its next run recomputes it
    run_twophoton(ds, ["spikes"], overwrite=["spikes"], show_progress=False)
    assert ds.provenance.get("twophoton.functional")["status"] == "stale"
    run_twophoton(ds, ["functional"], config={"functional": {"n_surrogates": 50}}, show_progress=False)
    assert ds.provenance.get("twophoton.functional")["status"] == "done"


def test_bad_settings_and_missing_inputs_are_one_line_errors(tmp_path):
    ds = Dataset.create(tmp_path / "e.zarr")
    ds.write_raw(np.zeros((50, 4, 4), np.uint16), kind="twophoton", scale=(1 / FS, 1, 1))
    with pytest.raises(StageError, match="run --stages extraction first"):
        run_spikes(ds, show_progress=False)
    with pytest.raises(StageError, match="traces/spikes"):
        run_functional(ds)
    with pytest.raises(StageError, match="traces/dff"):
        run_functional(ds, config=FunctionalConfig(source="dff"))
    with pytest.raises(InputError, match="unknown spikes setting"):
        SpikesConfig.from_dict({"ar": 2})
    with pytest.raises(InputError, match="functional source"):
        run_functional(ds, config=FunctionalConfig(source="F"))


def test_short_recording_keeps_correlations_without_surrogates(tmp_path):
    ds, _ = dff_store(tmp_path, n_cells=12, frames=200)  # 13 s at 15 Hz < 2 × 10 s
    m = run_functional(ds, config=FunctionalConfig(source="dff", threshold=0.0))
    e = ds.read_table("graph/functional_edges").to_pydict()
    assert m["n_edges"] == len(e["roi_a"]) > 0 and "no surrogate test" in m["note"]
    assert np.all(np.isnan(e["p_value"]))
