"""4x4 affines of image grids and rigid transforms agree with SimpleITK's own point mapping."""
import math

import numpy as np
import SimpleITK as sitk

from FCMSegmentationLib.affine import apply_affine, index_to_physical_matrix, rigid_matrix


def test_index_to_physical_matrix_maps_indices_as_simpleitk_does():
    image = sitk.Image([5, 6, 7], sitk.sitkUInt8)
    image.SetSpacing((0.8, 1.7, 3.1))
    image.SetOrigin((-12.0, 40.5, 3.25))
    image.SetDirection(sitk.VersorTransform((0.3, -0.5, 1.0), 0.6).GetMatrix())
    index = np.array([[0, 0, 0], [4, 5, 6], [2, 3, 1]], dtype=np.float64)
    expected = [image.TransformIndexToPhysicalPoint([int(v) for v in i]) for i in index]
    np.testing.assert_allclose(apply_affine(index_to_physical_matrix(image), index), expected, atol=1e-9)


def test_rigid_matrix_maps_points_as_the_transform_does():
    transform = sitk.Euler3DTransform()
    transform.SetCenter((5.0, -20.0, 30.0))
    transform.SetMatrix(sitk.VersorTransform((0.2, 1.0, -0.4), math.radians(7.0)).GetMatrix())
    transform.SetTranslation((2.5, -1.5, 3.0))
    points = np.array([[0.0, 0.0, 0.0], [100.0, -50.0, 20.0], [5.0, -20.0, 30.0]])
    expected = [transform.TransformPoint(p) for p in points.tolist()]
    np.testing.assert_allclose(apply_affine(rigid_matrix(transform), points), expected, atol=1e-9)
