"""Figure: detected ROIs and the manual Neurofinder ROIs on the mean image.

    python docs/detection_figure.py STORE.zarr docs/images/detection_neurofinder.png

``STORE.zarr`` is the Neurofinder crop after ``connectome twophoton`` with the
registration, summary and detection stages (``benchmarks/detection.py`` makes
one). Left half: ground truth (``regions_left.json``) in green, our ROIs in
cyan (activity) and magenta (anatomical); the right half has no ground truth.
"""

import json
import sys
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np

from connectome.io import Dataset

DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "neurofinder-crop"


def main(store: Path, out: Path) -> None:
    ds = Dataset(store, "r")
    mean = ds.array("twophoton/summary/mean")[...]
    lab = ds.array("twophoton/rois/labels")[...]
    rois = ds.read_table("twophoton/rois").to_pandas()
    gt = np.zeros(lab.shape, bool)
    regions = json.loads((DATA / "regions_left.json").read_text())
    fig, ax = plt.subplots(figsize=(8, 8))
    lo, hi = np.percentile(mean, [1, 99.7])
    ax.imshow(mean, cmap="gray", vmin=lo, vmax=hi)
    for r in regions:
        m = np.zeros(lab.shape, bool)
        c = np.array(r["coordinates"])
        m[c[:, 0], c[:, 1]] = True
        ax.contour(m, levels=[0.5], colors="lime", linewidths=1.2)
        gt |= m
    for rid, src in zip(rois.roi_id, rois.source):
        ax.contour(lab == rid, levels=[0.5], colors="cyan" if src == "activity" else "magenta", linewidths=0.7)
    ax.axvline(127.5, color="yellow", lw=0.6, ls="--")
    ax.set_title("Neurofinder crop: manual ROIs (green, left half only),\n"
                 "ours: activity (cyan), anatomical (magenta)")
    ax.axis("off")
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=80, bbox_inches="tight")
    print(out)


if __name__ == "__main__":
    main(Path(sys.argv[1]), Path(sys.argv[2]))
