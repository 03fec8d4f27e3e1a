"""4x4 affine matrices of image grids and rigid transforms, in SimpleITK's LPS physical space."""
import numpy as np
import SimpleITK as sitk


def index_to_physical_matrix(image: sitk.Image) -> np.ndarray:
    """4x4 affine mapping (x, y, z, 1) voxel indices to physical (LPS) points."""
    direction = np.array(image.GetDirection()).reshape(3, 3)
    affine = np.eye(4)
    affine[:3, :3] = direction @ np.diag(image.GetSpacing())
    affine[:3, 3] = image.GetOrigin()
    return affine


def rigid_matrix(transform: sitk.Euler3DTransform) -> np.ndarray:
    """4x4 affine of a rigid transform: ``x -> R (x - centre) + centre + translation``."""
    rotation = np.array(transform.GetMatrix()).reshape(3, 3)
    centre = np.array(transform.GetCenter())
    affine = np.eye(4)
    affine[:3, :3] = rotation
    affine[:3, 3] = centre + np.array(transform.GetTranslation()) - rotation @ centre
    return affine


def apply_affine(affine: np.ndarray, points: np.ndarray) -> np.ndarray:
    """(N, 3) ``points`` mapped by a 4x4 ``affine``."""
    return points @ affine[:3, :3].T + affine[:3, 3]
