"""SPECT by projection and OS-EM reconstruction, as a camera and its reconstruction software make it.

The image-space chain (``imaging``) puts Poisson noise on each voxel independently. A real SPECT is
reconstructed from noisy projections: its noise is correlated over several voxels and grows with the
iterations, and a reconstruction that models the camera's blur (resolution recovery) sharpens edges and
overshoots at them. This module gives a phantom that texture: the expected image on the SPECT grid
(already blurred by the camera) is projected at ``views`` angles about the SPECT's z axis, Poisson noise
is drawn on the projections (the same expected total counts as the image-space chain), and the volume is
reconstructed by ordered-subsets expectation maximisation (Hudson & Larkin 1994), with or without a model
of part of the blur. The projector rotates each axial slice and sums along rows (parallel beam); its
adjoint rotates back. Attenuation and scatter stay as the image-space chain models them (in the expected
image), so only the noise model and the reconstruction differ.
"""
import math
from dataclasses import dataclass
from typing import Any, Dict, Optional, Sequence, Tuple

import numpy as np
import torch
import torch.nn.functional as F

from .geometry import FWHM_TO_SIGMA
from .ranges import SimulationRanges, rounded

#: The random stream (with the phantom's seed) that decides on OS-EM and draws its settings and noise, so
#: that the phantom's anatomy, lesions and every other parameter are the same either way.
OSEM_STREAM = 11
#: Voxels below this fraction of the brightest expected count are outside the rotated region (air).
SUPPORT_FRACTION = 1e-3


@dataclass(frozen=True)
class OsemSettings:
    """How one SPECT is acquired and reconstructed.

    views: projection angles over 360 degrees. subsets, iterations: of OS-EM (subsets * iterations updates).
    psf_model_fwhm_mm: FWHM of the blur the reconstruction models (resolution recovery); 0 for none.
    """

    views: int
    subsets: int
    iterations: int
    psf_model_fwhm_mm: float

    def as_params(self) -> Dict[str, Any]:
        return {"osem_views": self.views, "osem_subsets": self.subsets, "osem_iterations": self.iterations,
                "osem_psf_model_fwhm_mm": rounded(self.psf_model_fwhm_mm)}


def sample_osem(seed: int, ranges: SimulationRanges, psf_fwhm_mm: float
                ) -> Tuple[Optional[OsemSettings], np.random.Generator]:
    """(settings, stream) of phantom ``seed``: its OS-EM settings, or None (image-space noise) with
    probability ``1 - osem_probability``, and the stream, of its own, that then draws the projections' noise.

    With ``osem_probability`` 0 nothing is drawn.
    """
    rng = np.random.default_rng((seed, OSEM_STREAM))
    if ranges.osem_probability <= 0 or rng.random() >= ranges.osem_probability:
        return None, rng
    views = int(rng.integers(int(ranges.osem_views[0]), int(ranges.osem_views[1]) + 1))
    subsets = int(rng.integers(int(ranges.osem_subsets[0]), int(ranges.osem_subsets[1]) + 1))
    iterations = int(rng.integers(int(ranges.osem_iterations[0]), int(ranges.osem_iterations[1]) + 1))
    modelled = rng.random() < ranges.osem_resolution_recovery_probability
    fraction = float(rng.uniform(*ranges.osem_psf_model_fraction))
    return OsemSettings(views, min(subsets, views), iterations, psf_fwhm_mm * fraction if modelled else 0.0), rng


def _support_square(expected_counts: np.ndarray) -> Tuple[Tuple[slice, slice], int]:
    """In-plane (rows, cols) box of the image's activity, and the side of a square, centred on that box, whose
    inscribed circle holds all of it: what rotating for every view needs, and no more (the SPECT's field is
    often much wider than the body)."""
    plane = expected_counts.max(axis=0) > SUPPORT_FRACTION * float(expected_counts.max())
    rows, cols = np.nonzero(plane)
    box = (slice(int(rows.min()), int(rows.max()) + 1), slice(int(cols.min()), int(cols.max()) + 1))
    centre_row, centre_col = (rows.min() + rows.max()) / 2.0, (cols.min() + cols.max()) / 2.0
    radius = float(np.sqrt((rows - centre_row) ** 2 + (cols - centre_col) ** 2).max())
    return box, int(math.ceil(2.0 * radius)) + 3


def _rotation_grids(angles: Sequence[float], side: int) -> torch.Tensor:
    """(views, side, side, 2) sampling grids rotating a square image by each angle about its centre."""
    cos, sin = torch.cos(torch.tensor(angles)), torch.sin(torch.tensor(angles))
    theta = torch.zeros(len(angles), 2, 3)
    theta[:, 0, 0], theta[:, 0, 1], theta[:, 1, 0], theta[:, 1, 1] = cos, -sin, sin, cos
    return F.affine_grid(theta, [len(angles), 1, side, side], align_corners=False)


def _rotate(volume: torch.Tensor, grid: torch.Tensor) -> torch.Tensor:
    """(Z, S, S) volume resampled on one view's grid (S, S, 2), bilinear, zero outside."""
    return F.grid_sample(volume[None], grid[None], mode="bilinear", padding_mode="zeros",
                         align_corners=False)[0]


def forward_project(volume: torch.Tensor, grids: torch.Tensor) -> torch.Tensor:
    """(views, Z, S) parallel projections of a (Z, S, S) volume: rotate, then sum along x."""
    return torch.stack([_rotate(volume, grid).sum(dim=2) for grid in grids])


def back_project(projections: torch.Tensor, inverse_grids: torch.Tensor) -> torch.Tensor:
    """(Z, S, S) sum of each (Z, S) projection smeared along x and rotated back by its view's angle.

    ``inverse_grids``: the grids of the opposite angles; rotating back is, up to interpolation, the adjoint.
    """
    side = projections.shape[2]
    total = torch.zeros(projections.shape[1], side, side)
    for projection, grid in zip(projections, inverse_grids):
        total += _rotate(projection[:, :, None].expand(-1, -1, side).contiguous(), grid)
    return total


def _gaussian_blur(volume: torch.Tensor, sigma_vox: float) -> torch.Tensor:
    """A (Z, S, S) volume blurred by an isotropic Gaussian of ``sigma_vox`` voxels (separable, zero-padded)."""
    if sigma_vox <= 0:
        return volume
    radius = max(1, int(math.ceil(3 * sigma_vox)))
    x = torch.arange(-radius, radius + 1, dtype=volume.dtype)
    kernel = torch.exp(-0.5 * (x / sigma_vox) ** 2)
    kernel = kernel / kernel.sum()
    out = volume[None, None]
    for axis in range(3):
        shape = [1, 1, 1, 1, 1]
        shape[2 + axis] = kernel.numel()
        padding = [0, 0, 0]
        padding[axis] = radius
        out = F.conv3d(out, kernel.reshape(shape), padding=tuple(padding))
    return out[0, 0]


def osem_reconstruct(projections: torch.Tensor, angles: Sequence[float], subsets: int, iterations: int,
                     psf_sigma_vox: float = 0.0) -> torch.Tensor:
    """(Z, S, S) OS-EM estimate from (views, Z, S) projections taken at ``angles`` (radians).

    Views are dealt to ``subsets`` subsets in turn (view i to subset i mod subsets), so each subset spans
    the whole circle. ``psf_sigma_vox`` > 0 models that Gaussian blur in the system (resolution recovery).
    """
    side = projections.shape[2]
    grids = _rotation_grids(angles, side)
    inverse = _rotation_grids([-a for a in angles], side)
    estimate = torch.ones(projections.shape[1], side, side)
    groups = [list(range(start, len(angles), subsets)) for start in range(subsets)]
    sensitivities = [_gaussian_blur(back_project(torch.ones_like(projections[g]), inverse[g]), psf_sigma_vox)
                     for g in groups]
    for _ in range(iterations):
        for group, sensitivity in zip(groups, sensitivities):
            expected = forward_project(_gaussian_blur(estimate, psf_sigma_vox), grids[group])
            ratio = projections[group] / expected.clamp_min(1e-6)
            correction = _gaussian_blur(back_project(ratio, inverse[group]), psf_sigma_vox)
            estimate = estimate * correction / sensitivity.clamp_min(1e-6)
    return estimate


def osem_spect(expected_counts: np.ndarray, spacing_mm: float, settings: OsemSettings,
               rng: np.random.Generator) -> np.ndarray:
    """(Z, Y, X) float32 OS-EM reconstruction of a SPECT whose noise-free image is ``expected_counts``.

    expected_counts: expected counts per voxel as the image-space chain gives them (camera blur included),
    on a grid with isotropic in-plane ``spacing_mm``. The projections carry, over all views, the same
    expected total counts, with Poisson noise from ``rng``; the result is in the same units (counts per voxel).
    """
    if not expected_counts.max() > 0:
        return np.zeros(expected_counts.shape, np.float32)  # nothing to detect
    box, side = _support_square(expected_counts)
    cropped = np.ascontiguousarray(expected_counts[:, box[0], box[1]], dtype=np.float32)
    depth, rows, cols = cropped.shape
    top, left = (side - rows) // 2, (side - cols) // 2
    padded = torch.zeros(depth, side, side)
    padded[:, top:top + rows, left:left + cols] = torch.from_numpy(cropped)
    angles = [2.0 * math.pi * i / settings.views for i in range(settings.views)]
    with torch.no_grad():
        noise_free = forward_project(padded, _rotation_grids(angles, side)) / settings.views
        counts = torch.from_numpy(rng.poisson(noise_free.clamp_min(0).double().numpy()).astype(np.float32))
        sigma = settings.psf_model_fwhm_mm * FWHM_TO_SIGMA / spacing_mm
        estimate = osem_reconstruct(counts * settings.views, angles, settings.subsets, settings.iterations, sigma)
    result = np.zeros(expected_counts.shape, np.float32)
    result[:, box[0], box[1]] = estimate[:, top:top + rows, left:left + cols].numpy()
    return result
