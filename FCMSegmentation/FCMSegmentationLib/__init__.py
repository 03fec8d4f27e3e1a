"""FCMSegmentationLib: the Qt-free engine of the FCMSegmentation 3D Slicer extension.

Segments bone (1) and bone lesions (2) from SPECT with optional CT using a U-Net trained with the
(robust) fuzzy C-means losses of Chen et al. (Med. Phys. 2021). Imports only torch, numpy, SimpleITK and
scipy; the Slicer module and the ``fcmseg`` command line are front ends to it.
"""
__version__ = "0.1.0"
