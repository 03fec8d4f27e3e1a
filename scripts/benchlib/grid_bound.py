"""The ceiling of a model that works on a coarser grid: the truth passed through that grid and back."""
import numpy as np
import SimpleITK as sitk

from FCMSegmentationLib.preprocessing import NUM_CLASSES, array_to_image, prepare_case, resample_to
from FCMSegmentationLib.segmentation import mask_outside_field_of_view, result_from_working


def truth_through_working_grid(spect: sitk.Image, ct: sitk.Image, truth: sitk.Image, spacing_mm: float,
                               beyond_spect: bool = False) -> sitk.Image:
    """The truth's one-hot classes resampled linearly onto the working grid and back onto the CT grid by
    the model's own output path (outside the SPECT field: background, or no lesion when ``beyond_spect``),
    then labelled as that path labels (argmax, dense bone edge completed from the CT): what a perfect model
    on that grid would score (not a method)."""
    case = prepare_case(spect, ct, spacing_mm, beyond_spect)
    truth_array = sitk.GetArrayFromImage(truth)
    one_hot = np.stack([resample_to(array_to_image((truth_array == k).astype(np.float32), truth), case.grid)
                        for k in range(NUM_CLASSES)])
    return result_from_working(mask_outside_field_of_view(one_hot, case), case, "", []).labels
