"""The segmentation pipeline: images in, labels and soft memberships out (the engine's main entry)."""
from dataclasses import dataclass, field
from typing import List, Optional, Sequence, Union

import numpy as np
import SimpleITK as sitk
import torch

from .alignment import Alignment
from .cortex import complete_cortex
from .errors import InputError, require_voxel_size
from . import faint_lesions
from .inference import DEFAULT_PATCH, describe_device, estimate_run, resolve_device, run_with_fallback, sliding_window
from .lesion_core import trim_lesions
from .lesion_filter import drop_lesions_outside_bone
from .modelfile import LoadedModel, PathLike, load_model
from .preprocessing import (
    BACKGROUND,
    LESION,
    NUM_CLASSES,
    WorkingCase,
    array_to_image,
    labels_from_memberships,
    memberships_to_output,
    prepare_case,
    voxel_volume_ml,
)
from .progress import CancelToken, ProgressCallback, report, scaled


NO_CT_FOR_FAINT_LESIONS = "small faint lesions are kept: dropping them needs a CT (the rule was chosen for SPECT/CT)"


@dataclass
class SegmentationResult:
    """labels: uint8 image (0 background, 1 bone, 2 lesion) on the output grid.
    memberships: float32 image with one component per class on the output grid (sums to 1).
    device: where the network ran, in words. notes: remarks for the user (fallbacks, partial overlap).
    alignment: the SPECT/CT alignment looked for before segmenting (:mod:`alignment`); None if not.
    """

    labels: sitk.Image
    memberships: sitk.Image
    device: str
    notes: List[str] = field(default_factory=list)
    alignment: Optional[Alignment] = None


def mask_outside_field_of_view(memberships: np.ndarray, case: WorkingCase) -> np.ndarray:
    """Memberships (K, Z, Y, X) with no lesion outside the SPECT field of view (a lesion is seen by its
    uptake): there, pure background, or, when the case segments beyond the SPECT, bone and background
    renormalised (what the CT shows). Then the voxels beyond the image (``case.beyond_image``) take those of
    the nearest voxel inside it: the network saw padding there, and the image's last slices, which lie
    between such a voxel and the one inside, would otherwise be half background."""
    out = memberships.copy()
    outside = ~case.valid
    if case.beyond_spect:
        out[LESION][outside] = 0.0
        total = out[:, outside].sum(axis=0)
        out[:, outside] /= np.maximum(total, 1e-8)
        out[BACKGROUND][outside] += total <= 1e-8
    else:
        out[:, outside] = 0.0
        out[BACKGROUND][outside] = 1.0
    if case.beyond_image is not None:
        beyond, nearest_inside = case.beyond_image
        flat = out.reshape(out.shape[0], -1)  # a view: filling it fills ``out``
        flat[:, beyond] = flat[:, nearest_inside]
    return out


def predict_working(
    model: LoadedModel,
    case: WorkingCase,
    device: torch.device,
    patch: int = DEFAULT_PATCH,
    progress: Optional[ProgressCallback] = None,
    cancel: Optional[CancelToken] = None,
    notes: Optional[List[str]] = None,
) -> np.ndarray:
    """Memberships (K, Z, Y, X) on the working grid, by sliding window, with OOM fallback."""
    def run(dev: torch.device, size: int) -> np.ndarray:
        network = model.network.to(dev)
        return sliding_window(network, case.features, NUM_CLASSES, dev, network.size_multiple, size,
                              progress=progress, cancel=cancel)

    memberships, used = run_with_fallback(run, device, patch, notify=(notes.append if notes is not None else None))
    model.network.to(used)
    return mask_outside_field_of_view(memberships, case)


def decide_labels(memberships: np.ndarray, decision_weights: Optional[Sequence[float]] = None,
                  dense_bone: Optional[np.ndarray] = None, lesion_core: float = 0.0,
                  painted: Optional[np.ndarray] = None, voxel_ml: Optional[float] = None) -> np.ndarray:
    """Hard labels (uint8 (Z, Y, X)) from output-grid memberships (K, Z, Y, X) as Segment and Refine give
    them, and as calibration scores them: the argmax weighted by ``decision_weights``, each lesion narrowed
    to its core (voxels with at least ``lesion_core`` of its peak lesion membership, :mod:`lesion_core`;
    ``painted``, a bool mask of the user's strokes, is left as it is), the small faint lesions dropped
    where ``voxel_ml`` (the grid's voxel volume) is given (:mod:`faint_lesions`), then, where ``dense_bone``
    (the CT's dense voxels) is given, the dense edge of bone completed (:mod:`cortex`)."""
    labels = labels_from_memberships(memberships, decision_weights)
    weights = decision_weights if decision_weights is not None else (1.0,) * NUM_CLASSES
    if lesion_core:
        labels = trim_lesions(labels, memberships, weights, lesion_core, painted)
    if voxel_ml is not None:
        labels = faint_lesions.drop_faint_lesions(labels, memberships, weights, voxel_ml, painted)
    return labels if dense_bone is None else complete_cortex(labels, memberships, dense_bone)


def result_from_working(memberships: np.ndarray, case: WorkingCase, device: str, notes: List[str],
                        decision_weights: Optional[Sequence[float]] = None,
                        painted: Optional[np.ndarray] = None, complete_cortex_edge: bool = True,
                        lesion_core: float = 0.0, drop_faint_lesions: bool = False) -> SegmentationResult:
    """Resample working-grid memberships onto the output grid; labels are their argmax, weighted by the
    model's ``decision_weights`` (see :func:`preprocessing.labels_from_memberships`), each lesion narrowed
    to its ``lesion_core`` (:mod:`lesion_core`), with a CT the small faint lesions dropped
    (:mod:`faint_lesions`) if ``drop_faint_lesions``, with the dense edge of bone completed from the CT
    (:mod:`cortex`) unless not ``complete_cortex_edge`` or there is no CT.

    painted: optional stroke codes on the output grid (0 unpainted, 1 background, 2 bone, 3 lesion);
    painted voxels keep their painted class, with membership 1, as in Slicer's Grow-from-seeds.
    """
    on_output = memberships_to_output(memberships, case)
    where = None if painted is None else painted > 0
    if where is not None and where.any():
        on_output[:, where] = 0.0
        for code in np.unique(painted[where]):
            on_output[int(code) - 1][painted == code] = 1.0
    # painted background (membership 1) is out of the cortex completion's reach
    drop_faint = case.has_ct and drop_faint_lesions
    if drop_faint_lesions and not case.has_ct:
        notes = notes + [NO_CT_FOR_FAINT_LESIONS]
    labels = decide_labels(on_output, decision_weights, case.dense_bone if complete_cortex_edge else None,
                           lesion_core, where, voxel_volume_ml(case.output_reference) if drop_faint else None)
    labels = array_to_image(labels, case.output_reference)
    vector = sitk.GetImageFromArray(np.moveaxis(on_output, 0, -1), isVector=True)
    vector.CopyInformation(case.output_reference)
    return SegmentationResult(labels, vector, device, list(case.notes) + notes, case.alignment)


def segment(
    spect: sitk.Image,
    ct: Optional[sitk.Image] = None,
    model: Union[LoadedModel, PathLike, None] = None,
    device: str = "auto",
    patch: int = DEFAULT_PATCH,
    progress: Optional[ProgressCallback] = None,
    cancel: Optional[CancelToken] = None,
    keep_lesions_outside_bone: bool = False,
    complete_cortex_edge: bool = True,
    align: bool = True,
    drop_faint_lesions: bool = False,
    working_spacing_mm: Optional[float] = None,
) -> SegmentationResult:
    """Segment bone and lesions in ``spect`` (and ``ct`` if given) with ``model`` (default: shipped one).

    Output is on the CT's grid when a CT is given, else on the SPECT's. With a CT, predicted lesions that
    are not in bone on the CT are left out (see :mod:`lesion_filter`) unless ``keep_lesions_outside_bone``.
    Labels follow the model's calibrated decision weights and lesion core (:mod:`lesion_core`); with a CT
    small faint lesions are dropped (:mod:`faint_lesions`) if ``drop_faint_lesions``, and the dense edge
    of bone that the working grid rounds off is put back from the CT (see :mod:`cortex`) unless not
    ``complete_cortex_edge``; the memberships are the network's, unweighted. With a CT, a rigid
    SPECT/CT misregistration is first found and undone (:mod:`alignment`) unless not ``align``.
    working_spacing_mm: the voxel size of the grid the network runs on, in place of the model's calibrated
    one (:meth:`modelfile.LoadedModel.working_spacing_mm`, by default the grid it learnt on); a finer grid
    costs time and memory as the cube of the ratio, and the calibrated decision was chosen on the card's grid.
    """
    if working_spacing_mm is not None:
        require_voxel_size(working_spacing_mm, "the working grid's voxel size")
    torch_device = resolve_device(device)
    loaded = model if isinstance(model, LoadedModel) else load_model(model, torch_device)
    multiple = loaded.network.size_multiple
    if patch < multiple:
        raise InputError(f"patch size {patch} is too small; use at least {multiple} voxels (default {DEFAULT_PATCH})")
    report(progress, 0.0, "preparing images")
    spacing_mm = working_spacing_mm or loaded.working_spacing_mm(ct is not None)
    case = prepare_case(spect, ct, spacing_mm, loaded.segments_beyond_spect, align)
    # Upfront: how many patches, how long, how much memory (patching bounds the network's memory).
    estimate = estimate_run(case.features.shape[1:], patch, torch_device, loaded.network.config,
                            multiple=multiple, in_channels=case.features.shape[0], out_channels=NUM_CLASSES)
    notes: List[str] = [estimate.message(torch_device)]
    report(progress, 0.05, notes[0])
    memberships = predict_working(loaded, case, torch_device, patch, scaled(progress, 0.05, 0.9), cancel, notes)
    if not keep_lesions_outside_bone:
        memberships, dropped = drop_lesions_outside_bone(memberships, case)
        notes += dropped
    report(progress, 0.92, "resampling onto the output grid")
    result = result_from_working(memberships, case, describe_device(torch_device), notes,
                                 loaded.decision_weights(case.has_ct), complete_cortex_edge=complete_cortex_edge,
                                 lesion_core=loaded.lesion_core(case.has_ct), drop_faint_lesions=drop_faint_lesions)
    report(progress, 1.0, "done")
    return result
