"""GPU kernels against their CPU twins.

``gpu``-marked tests run the kernels on a real GPU with CuPy inputs and
compare with the CPU function they replace (skipped without CUDA). The
unmarked tests check on the CPU what does not need a device: the CPU twins
themselves against the functions they stand in for, the array-namespace
code paths with NumPy, and the errors. The ``numba.cuda`` kernels also run
on the CPU under the CUDA simulator in ``tests/test_cudasim.py``.
"""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import numpy as np
import pytest
import scipy.ndimage as ndi

import test_cudasim as checks
from connectome import _cuda
from connectome.errors import InputError


def _cupy():
    return pytest.importorskip("cupy")


def _dev(a):
    return _cupy().asarray(a)


def _host(a):
    return a.get() if hasattr(a, "get") else np.asarray(a)


def _same(a):
    return np.asarray(a)


def _suite():
    """benchmarks/gpu_suite.py as a module (it is a script, not a package)."""
    path = Path(__file__).resolve().parents[1] / "benchmarks" / "gpu_suite.py"
    spec = importlib.util.spec_from_file_location("gpu_suite", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


SUITE = _suite()
STAGE_NAMES = [m.__name__ for m in SUITE.STAGES]
TINY = 0.02  # the suite's --scale for tests: every stage in a few seconds on 2 cores


def _perturb(a):
    """A clearly wrong copy of a stage output: floats moved by 5 % of their range, ints by one."""
    if isinstance(a, dict):
        return {k: _perturb(v) for k, v in a.items()}
    if isinstance(a, (tuple, list)):
        return type(a)(_perturb(v) for v in a)
    a = np.asarray(a)
    if a.dtype.kind == "f":
        finite = a[np.isfinite(a)]
        return a + 0.05 * (float(np.max(np.abs(finite))) if finite.size else 1.0) + 1e-3
    if a.dtype.kind in "iu":
        return a + a.dtype.type(1)
    return a


def _synthetic_relief(seed=0, shape=(4, 96, 96)):
    """A boundary map of synthetic EM (smoothed membranes plus noise) and its 2-D seeds."""
    from connectome.em._watershed import _seeds
    from connectome.synth.em import make_volume

    _, truth = make_volume(shape, seed=seed)
    rng = np.random.default_rng(seed)
    prob = ndi.gaussian_filter(truth.boundaries.astype(np.float32), (0, 1, 1))
    prob = np.clip(prob / max(prob.max(), 1e-6) + rng.normal(0, 0.05, prob.shape), 0, 1).astype(np.float32)
    z = shape[0] // 2
    seeds, n, dist = _seeds(prob[z], 0.3, (8.0, 8.0), 3.0, 1.0, 16.0)
    return prob[z], seeds, dist, n


# ------------------------------------------------------------------ CPU: twins and namespace paths
def test_minimax_twin_agrees_with_priority_flood_on_synthetic_em():
    # the GPU watershed's exact CPU twin against skimage's priority flood (the CPU stage):
    # identical where no two voxels tie; with the plateaus of a clipped map (a third of the
    # voxels at 0) the floods break ties differently on <= 0.5 % of the voxels
    from connectome.em import _watershed_gpu as wg
    from connectome.em._watershed import _watershed

    prob, seeds, dist, n = _synthetic_relief()
    assert n > 5
    scale = 16.0 * 8.0
    for relief, least in ((prob, 0.995), (prob + np.random.default_rng(9).uniform(0, 1e-3, prob.shape), 1.0)):
        relief = relief.astype(np.float32)
        want = _watershed(relief, seeds, dist, scale)
        got = wg.minimax_reference(relief - dist * np.float32(0.4 / 255.0 / scale), seeds)
        agree = float(np.mean(got == want))
        assert agree >= least, agree


def test_rag_statistics_numpy_path_equals_block_rag():
    checks.check_rag(_same, _same)


def test_gpu_kernels_refuse_host_arrays_outside_the_simulator():
    if _cuda.simulator():
        pytest.skip("the simulator takes NumPy arrays")
    from connectome import _labels_gpu
    from connectome.em import _watershed_gpu

    with pytest.raises(InputError, match="CuPy") as info:
        _labels_gpu.label_block(np.ones((3, 3), bool))
    assert "\n" not in str(info.value)
    with pytest.raises(InputError, match="CuPy"):
        _watershed_gpu.minimax_watershed(np.zeros((3, 3), np.float32), np.zeros((3, 3), np.int32))


def test_label_offsets_are_the_earlier_half_of_the_structure():
    from connectome._labels_gpu import _offsets

    for ndim in (1, 2, 3):
        for c in range(1, ndim + 1):
            offs = _offsets(ndim, c)
            full = np.argwhere(ndi.generate_binary_structure(ndim, c)) - 1
            full = [tuple(o) for o in full if any(o)]
            assert len(offs) * 2 == len(full)
            assert all(tuple(o[3 - ndim:]) < (0,) * ndim for o in offs)


# ------------------------------------------------------------------ GPU
@pytest.mark.gpu
def test_label_block_gpu():
    checks.check_label_block(_dev, _host)
    from connectome import _labels_gpu, labels

    vol = ndi.gaussian_filter(np.random.default_rng(7).random((40, 128, 128)), 2) > 0.5
    want, n = labels.label_block(vol, connectivity=3)
    got, m = _labels_gpu.label_block(_dev(vol), connectivity=3)
    assert m == n and np.array_equal(_host(got), want)


@pytest.mark.gpu
def test_minimax_watershed_gpu():
    checks.check_minimax_watershed(_dev, _host)
    from connectome.em import _watershed_gpu as wg

    prob, seeds, dist, _ = _synthetic_relief(seed=3)
    got = _host(wg._watershed(_dev(prob), _dev(seeds), _dev(dist), 128.0))
    want = wg.minimax_reference(prob - dist * np.float32(0.4 / 255.0 / 128.0), seeds)
    assert np.array_equal(got, want)


@pytest.mark.gpu
def test_forest_gpu():
    checks.check_forest(_dev, _host)


@pytest.mark.gpu
def test_rag_statistics_gpu():
    checks.check_rag(_dev, _host)


@pytest.mark.gpu
def test_aggregate_gpu():
    checks.check_aggregate(_dev, _host)


# ------------------------------------------------------------------ the benchmark suite
def test_suite_covers_every_stage_of_issue_9():
    want = {"stage_registration", "stage_summary", "stage_extraction", "stage_oasis", "stage_functional",
            "stage_filter_bank", "stage_forest", "stage_watershed", "stage_rag", "stage_labels",
            "stage_relabel", "stage_aggregate"}
    assert want <= set(STAGE_NAMES)


@pytest.mark.parametrize("name", STAGE_NAMES)
def test_suite_agreement_check_accepts_equal_and_rejects_wrong(name):
    # the CPU output must pass its own check and a perturbed copy must fail it, so a GPU
    # result that is wrong cannot be reported as agreeing
    make = getattr(SUITE, name)
    label, unit, items, nbytes, cpu, gpu, check = make(TINY, None)
    assert gpu is None and items > 0 and nbytes > 0
    out = SUITE._host(cpu())
    ok, how = check(out, out)
    assert ok, how
    bad, how = check(out, _perturb(out))
    assert not bad, how


def test_suite_command_prints_table_and_json_without_gpu(tmp_path, capsys):
    from connectome.backend import gpu_available

    out = tmp_path / "gpu.json"
    result = SUITE.main(["--scale", str(TINY), "--only", "labels,relabel", "--json", str(out)])
    assert json.loads(out.read_text())["rows"] == json.loads(json.dumps(result["rows"]))
    assert [r["stage"] for r in result["rows"]] == ["connected components", "relabel lookup table"]
    assert all(r["cpu_rate"] > 0 for r in result["rows"])
    text = capsys.readouterr().out
    if not gpu_available():
        assert result["device"] == "no GPU"
        assert all("gpu_s" not in r for r in result["rows"]) and "no GPU" in text
    with pytest.raises(SystemExit):
        SUITE.main(["--only", "no_such_stage"])


@pytest.mark.gpu
@pytest.mark.parametrize("name", STAGE_NAMES)
def test_stage_gpu_agrees_with_cpu(name):
    # every stage of the suite on CuPy against the CPU function, with the suite's tolerance
    cp = _cupy()
    label, unit, items, nbytes, cpu, gpu, check = getattr(SUITE, name)(0.1, cp)
    assert gpu is not None
    want = SUITE._host(cpu())
    got = SUITE._host(gpu())
    ok, how = check(want, got)
    assert ok, f"{label}: {how}"


def test_registration_recovers_true_shifts(xp):
    # NumPy here, and CuPy where a GPU exists (the fixture's ``gpu`` param)
    from connectome.synth.twophoton import make_movie
    from connectome.twophoton.registration import prepare_reference, register_frames

    movie, truth = make_movie((40, 128, 128), motion="rigid", max_shift=4.0, seed=21, dtype=np.float32)
    ref = prepare_reference(xp.asarray(truth.reference))
    reg, shifts, quality = register_frames(xp.asarray(movie), ref)
    assert isinstance(reg, xp.ndarray) and reg.dtype == xp.float32
    err = np.abs(_host(shifts) - truth.shifts)
    assert float(np.median(err)) < 0.1 and float(err.max()) < 0.5, err.max()


def test_extraction_matches_dense_footprint_means(xp):
    import scipy.sparse as sp

    from connectome.synth.twophoton import make_movie
    from connectome.twophoton.extraction import extract_traces, normalize_rows

    movie, truth = make_movie((30, 96, 96), motion="none", seed=22, dtype=np.float32)
    f = truth.footprints.reshape(truth.n_cells, -1)
    w = normalize_rows(sp.csr_matrix(np.where(f >= 0.1, f, 0)))
    got = _host(extract_traces(xp.asarray(movie), w))
    want = (w.toarray().astype(np.float64) @ movie.reshape(len(movie), -1).T.astype(np.float64))
    empty = np.asarray(w.sum(axis=1)).ravel() == 0
    assert np.array_equal(np.isnan(got).any(axis=1), empty)
    np.testing.assert_allclose(got[~empty], want[~empty], rtol=1e-4, atol=1e-3)
