"""One simulated study (:class:`PhantomCase`) and the label codes its maps use."""
from dataclasses import dataclass, field
from typing import Any, Dict

import SimpleITK as sitk

BACKGROUND, BONE, LESION = 0, 1, 2

#: Codes of an organ map (returned by ``bone_mask_from_totalsegmentator``, accepted as ``organ_labels``).
ORGAN_CODES = {"kidney": 1, "liver": 2, "bladder": 3}


@dataclass
class PhantomCase:
    """One simulated study.

    spect: float32 counts on its own SPECT grid. ct: int16 HU on the CT grid. truth: uint8 labels
    (0 background, 1 bone, 2 lesion) with exactly the CT's geometry. params: JSON-serialisable record
    of the seed, kind and every sampled parameter (lesions with centre, diameter and contrast).
    """

    spect: sitk.Image
    ct: sitk.Image
    truth: sitk.Image
    params: Dict[str, Any] = field(default_factory=dict)
