"""Painted strokes -> per-voxel class labels on the working grid.

Stroke code convention (what the Slicer module and ``--scribbles`` files use): 0 unpainted,
1 background, 2 bone, 3 lesion. Class label = code - 1; unlabelled voxels are :data:`UNLABELLED`.

Strokes may be painted on any grid (usually the CT's, finer than the working grid). Pulling them onto
the coarse working grid by nearest-neighbour *sampling* would drop thin strokes, so every painted voxel
is instead *scattered* to the working voxel nearest to its physical centre. Where codes collide in one
working voxel the higher code wins (lesion > bone > background): the rarest class is the one a user
paints deliberately.
"""
from typing import Dict

import numpy as np
import SimpleITK as sitk

from .affine import index_to_physical_matrix
from .errors import InputError
from .preprocessing import CLASS_NAMES, WorkingCase, as_volume, resample_to

UNLABELLED = -1
STROKE_NAMES = {1: "background", 2: "bone", 3: "lesion"}
LESION_CODE = 3


def scribbles_to_labels(scribbles: sitk.Image, case: WorkingCase) -> np.ndarray:
    """Class labels (int64, (Z, Y, X), -1 unlabelled) on the working grid from a stroke-code image."""
    scribbles = as_volume(scribbles, "scribbles")
    codes = np.rint(sitk.GetArrayViewFromImage(scribbles)).astype(np.int64)
    if codes.min() < 0 or codes.max() > 3:
        raise InputError(
            "scribbles: codes must be 0 unpainted, 1 background, 2 bone, 3 lesion; "
            f"found values from {codes.min()} to {codes.max()}"
        )
    labels = np.full(case.valid.shape, UNLABELLED, dtype=np.int64)
    to_working = np.linalg.inv(index_to_physical_matrix(case.grid)) @ index_to_physical_matrix(scribbles)
    size_xyz = np.array(case.valid.shape[::-1])
    for code in (1, 2, 3):  # ascending, so higher codes overwrite lower ones
        zyx = np.argwhere(codes == code)
        if zyx.size == 0:
            continue
        xyz1 = np.concatenate([zyx[:, ::-1], np.ones((len(zyx), 1))], axis=1)
        target = np.rint(xyz1 @ to_working.T)[:, :3].astype(np.int64)
        inside = np.all((target >= 0) & (target < size_xyz), axis=1)
        x, y, z = target[inside].T
        labels[z, y, x] = code - 1
    labels[~case.segmented] = UNLABELLED
    painted = int((codes > 0).sum())
    if painted and not (labels != UNLABELLED).any():
        raise InputError(
            f"no painted strokes inside the image: all {painted} painted voxels lie outside it "
            "(were the strokes painted on this image, in the same frame of reference?)"
        )
    return labels


def scribbles_to_output(scribbles: sitk.Image, case: WorkingCase) -> np.ndarray:
    """Stroke codes (uint8 (z, y, x), 0 unpainted) on the output grid, by nearest neighbour: the painted
    voxels the result keeps as painted."""
    scribbles = as_volume(scribbles, "scribbles")
    codes = sitk.Cast(sitk.Round(scribbles), sitk.sitkUInt8)
    return resample_to(codes, case.output_reference, linear=False).astype(np.uint8)


def stroke_counts(labels: np.ndarray) -> Dict[str, int]:
    """Labelled working voxels per class name."""
    return {name: int((labels == k).sum()) for k, name in enumerate(CLASS_NAMES)}


def require_strokes(labels: np.ndarray) -> None:
    """Raise :class:`InputError` if no stroke lies inside the image's field of view."""
    if not (labels != UNLABELLED).any():
        raise InputError(
            "no painted strokes inside the image: paint at least one stroke (Background, Bone or Lesion) "
            "on the image, or use Adapt for label-free fine-tuning"
        )
