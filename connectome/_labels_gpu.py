"""Connected components on the GPU: union-find with atomics (``numba.cuda``).

GPU twin of :func:`connectome.labels.label_block` (same inputs, same output
— the labels are numbered exactly as ``scipy.ndimage.label`` numbers them).

Notes
-----
Playne & Hawick, "A new algorithm for parallel connected-component
labelling on GPUs", IEEE TPDS 29 (2018): every foreground voxel starts as
its own tree (``parent[i] = i``); one thread per voxel unites it with each
earlier neighbour of the structuring element, hooking the larger root under
the smaller with ``atomicMin`` and retrying when another thread got there
first; a second pass points every voxel at its root. Roots are then the
smallest raster index of each component, so ranking the roots in raster
order (a cumulative sum) gives scipy's numbering: components in order of
their first voxel.
"""

from __future__ import annotations

import itertools

import numpy as np

from connectome import _cuda
from connectome.errors import InputError


def _offsets(ndim: int, connectivity: int) -> np.ndarray:
    """Neighbour offsets (as 3-D) that come earlier in raster order."""
    out = []
    for off in itertools.product((-1, 0, 1), repeat=ndim):
        if not any(off) or sum(o != 0 for o in off) > connectivity:
            continue
        if off > (0,) * ndim:  # keep the half that precedes the voxel
            continue
        out.append((0,) * (3 - ndim) + off)
    return np.asarray(out, np.int64).reshape(-1, 3)


cuda = None  # numba.cuda, bound by _build (a global, so the simulator can swap it)


def _build():
    global cuda
    cuda = _cuda.cuda()

    @cuda.jit(device=True)
    def find(parent, i):
        while parent[i] != i:
            i = parent[i]
        return i

    @cuda.jit
    def init(mask, parent):
        i = cuda.grid(1)
        if i < parent.shape[0]:
            parent[i] = i if mask[i] else -1

    @cuda.jit
    def merge(mask, parent, offsets, nz, ny, nx):
        i = cuda.grid(1)
        if i >= parent.shape[0] or not mask[i]:
            return
        z = i // (ny * nx)
        y = (i // nx) % ny
        x = i % nx
        for j in range(offsets.shape[0]):
            zz = z + offsets[j, 0]
            yy = y + offsets[j, 1]
            xx = x + offsets[j, 2]
            if zz < 0 or yy < 0 or xx < 0 or zz >= nz or yy >= ny or xx >= nx:
                continue
            q = (zz * ny + yy) * nx + xx
            if not mask[q]:
                continue
            a = find(parent, i)
            b = find(parent, q)
            while a != b:
                if a < b:
                    old = cuda.atomic.min(parent, b, a)
                    if old == b:
                        break
                    b = find(parent, old)
                else:
                    old = cuda.atomic.min(parent, a, b)
                    if old == a:
                        break
                    a = find(parent, old)

    @cuda.jit
    def flatten(parent):
        i = cuda.grid(1)
        if i < parent.shape[0] and parent[i] >= 0:
            parent[i] = find(parent, i)

    return init, merge, flatten


def label_block(image, *, threshold=None, connectivity: int = 1, offset: int = 0):
    """Connected components of a device array, ids shifted by ``offset``.

    Parameters
    ----------
    image : (…) CuPy array, 1 to 3 dimensions
        Foreground mask, or an image compared ``> threshold``.
    threshold : float, optional
        Foreground is ``image > threshold``; without it, ``image != 0``.
    connectivity : int
        1 = faces only … ``ndim`` = full neighbourhood.
    offset : int
        Added to every non-zero id.

    Returns
    -------
    labels : (…) uint64 CuPy array
        0 = background, otherwise ``offset + 1 … offset + n``, numbered as
        ``scipy.ndimage.label`` numbers them.
    n : int
        Number of components.

    Notes
    -----
    Union-find with atomics (see the module notes); exact.
    """
    xp = _cuda.array_module(image)
    if not 1 <= image.ndim <= 3:
        raise InputError(f"label_block on the GPU takes 1-D to 3-D images, got {image.ndim}-D")
    if not 1 <= connectivity <= image.ndim:
        raise InputError(f"connectivity must be in 1..{image.ndim}, got {connectivity}")
    init, merge, flatten = _cuda.kernel(_build)
    shape = (1,) * (3 - image.ndim) + tuple(image.shape)
    mask = (image > threshold) if threshold is not None else (image != 0)
    mask = xp.ascontiguousarray(mask).reshape(-1).view(xp.uint8)
    n = mask.shape[0]
    parent = xp.empty(n, xp.int32 if n < 2**31 else xp.int64)
    offsets = xp.asarray(_offsets(image.ndim, connectivity))
    dm, dp, do = _cuda.device(mask), _cuda.device(parent), _cuda.device(offsets)
    _cuda.launch(init, n, xp, dm, dp)
    _cuda.launch(merge, n, xp, dm, dp, do, shape[0], shape[1], shape[2])
    _cuda.launch(flatten, n, xp, dp)
    labels, count = roots_to_labels(parent, xp)
    if offset and count:
        labels[labels > 0] += xp.uint64(offset)
    return labels.reshape(image.shape), count


def roots_to_labels(parent, xp):
    """Consecutive ids ``1 … n`` from flattened union-find parents (``-1`` = background).

    A root is its own parent; roots ranked in raster order give the ids.
    """
    n = parent.shape[0]
    is_root = parent == xp.arange(n, dtype=parent.dtype)
    rank = xp.cumsum(is_root, dtype=xp.int64)
    count = int(rank[-1]) if n else 0
    fg = parent >= 0
    labels = xp.zeros(n, xp.uint64)
    labels[fg] = rank[parent[fg]].astype(xp.uint64)
    return labels, count
