"""Random-forest inference on the GPU: one voxel per thread (``numba.cuda``).

GPU twin of :meth:`connectome.em._classifier.PixelClassifier.predict_features`
(same model arrays, same ``(F, …)`` feature stack, same float32 output,
bit for bit: the trees are summed in the same order in float32).

Notes
-----
The forest is stored as flat arrays (left, right, feature, threshold,
value; all trees concatenated, ``roots`` the first node of each), the
layout of scikit-learn's ``Tree`` and of GPU forest-inference libraries
(RAPIDS FIL). Each thread walks every tree for its voxel down to a leaf —
no padding to the deepest tree, unlike the CPU's level-by-level vectorised
walk — and reads feature ``f`` of voxel ``i`` at ``feats[f, i]``, so the
threads of a warp read neighbouring addresses.
"""

from __future__ import annotations

import numpy as np

from connectome import _cuda
from connectome.errors import InputError


cuda = None  # numba.cuda, bound by _build (a global, so the simulator can swap it)


def _build():
    global cuda
    cuda = _cuda.cuda()

    @cuda.jit
    def walk(feats, left, right, feature, threshold, value, roots, out):
        i = cuda.grid(1)
        if i >= out.shape[0]:
            return
        acc = np.float32(0.0)
        for t in range(roots.shape[0]):
            node = roots[t]
            while left[node] >= 0:
                if feats[feature[node], i] <= threshold[node]:
                    node = left[node]
                else:
                    node = right[node]
            acc += value[node]
        out[i] = acc / np.float32(roots.shape[0])

    return walk


def predict_features(model, feats):
    """Boundary probability of a feature stack on the GPU.

    Parameters
    ----------
    model : PixelClassifier
        The trained forest (its arrays are copied to the device once per call).
    feats : (F, …) float32 CuPy array

    Returns
    -------
    (…) float32 CuPy array
        Mean over trees of the leaf's boundary probability.
    """
    xp = _cuda.array_module(feats)
    if feats.shape[0] != model.spec.n_features:
        raise InputError(f"model expects {model.spec.n_features} features, got {feats.shape[0]}")
    shape = feats.shape[1:]
    n = int(np.prod(shape))
    flat = xp.ascontiguousarray(feats.reshape(feats.shape[0], n), dtype=xp.float32)
    arrays = [xp.asarray(np.ascontiguousarray(a, dtype=dt)) for a, dt in (
        (model.left, np.int32), (model.right, np.int32), (np.where(model.feature < 0, 0, model.feature), np.int32),
        (model.threshold, np.float32), (model.value, np.float32), (model.roots, np.int32))]
    out = xp.empty(n, xp.float32)
    walk = _cuda.kernel(_build)
    _cuda.launch(walk, n, xp, _cuda.device(flat), *(_cuda.device(a) for a in arrays), _cuda.device(out))
    return out.reshape(shape)
