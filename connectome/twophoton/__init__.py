"""Two-photon calcium imaging: registration, summary images, ROIs, traces, spikes, functional connectivity."""

from connectome.twophoton.registration import compute_reference, prepare_reference, register_frames
from connectome.twophoton.summary import summary_images
from connectome.twophoton.deconvolution import deconvolve, estimate_ar, estimate_noise, oasis
from connectome.twophoton.functional import correlation_edges, write_functional_edges
from connectome.twophoton.extraction import (baseline, delta_f_over_f, extract_traces, footprint_matrix,
                                              neuropil_masks, trace_quality)
from connectome.twophoton.detection import ROISet, bin_frames, detect_activity, detect_anatomical, detect_rois
