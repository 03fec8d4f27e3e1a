"""Move the SPECT's normalisation, to measure how much a model depends on where it puts bone uptake.

The engine divides the SPECT by its 99.5th percentile (:func:`preprocessing.normalise_spect`). Where that
percentile falls relative to the bone uptake depends on the image: noise, hot organs in the field, how
much of the field is bone. A simulator other than ours, or a real scanner, puts bone at another level
after normalisation. ``normalisation_moved(g)`` multiplies the normalised SPECT by ``g`` (as if the
percentile sat ``1/g`` times as high) while it is active, so the same phantoms can be segmented as if
their normalisation had landed elsewhere.
"""
import contextlib
from typing import Iterator, Tuple
from unittest import mock

import numpy as np


@contextlib.contextmanager
def normalisation_moved(gain: float) -> Iterator[None]:
    """Within the block, every prepared case's normalised SPECT is ``gain`` times what it would be
    (clipped as usual); ``gain == 1`` changes nothing."""
    from FCMSegmentationLib import preprocessing

    if not gain > 0:
        raise ValueError(f"a SPECT gain must be positive, got {gain}")
    plain = preprocessing.normalise_spect

    def moved(counts: np.ndarray, valid: np.ndarray) -> Tuple[np.ndarray, float]:
        _, scale = plain(counts, valid)
        return np.clip(counts / (scale / gain), 0.0, preprocessing.SPECT_CLIP).astype(np.float32), scale / gain

    with mock.patch.object(preprocessing, "normalise_spect", moved):
        yield
