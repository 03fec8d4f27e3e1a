"""``fcmseg phantom``: generate phantoms by kind and write them to disk."""
import dataclasses
import json
import time
from pathlib import Path
from typing import Callable, Dict, List, Optional

import numpy as np
import SimpleITK as sitk

from .. import imageio
from ..errors import InputError, OutputError
from ..progress import report
from .case import PhantomCase
from .ct_derived import ct_derived_phantom
from .procedural import procedural_phantom
from .ranges import (
    SHIFTED_RANGES,
    TRAINING_RANGES,
    SimulationRanges,
    check_seed,
    rounded,
)

ProgressCallback = Callable[[float, str], None]


def generate_phantom(
    seed: int,
    kind: str = "procedural",
    ranges: SimulationRanges = TRAINING_RANGES,
    ct: Optional[sitk.Image] = None,
    bone_labels: Optional[sitk.Image] = None,
    organ_labels: Optional[sitk.Image] = None,
) -> PhantomCase:
    """One phantom: ``kind='procedural'`` or ``kind='ct'`` (needs ``ct`` and ``bone_labels``)."""
    if kind == "procedural":
        if ct is not None or bone_labels is not None:
            raise InputError("a procedural phantom takes no CT or labels; use kind='ct' to build from a CT")
        return procedural_phantom(seed, ranges)
    if kind == "ct":
        if ct is None or bone_labels is None:
            raise InputError("a CT-derived phantom needs both a CT and a bone label map")
        return ct_derived_phantom(seed, ct, bone_labels, ranges, organ_labels=organ_labels)
    raise InputError(f"unknown phantom kind {kind!r}; use 'procedural' or 'ct'")


PHANTOM_FILES = {"spect": "spect.nii.gz", "ct": "ct.nii.gz", "truth": "truth.nii.gz", "params": "params.json"}


def write_phantom(case: PhantomCase, out_dir) -> Dict[str, Path]:
    """Write spect.nii.gz, ct.nii.gz, truth.nii.gz and params.json into ``out_dir`` (created), atomically."""
    out_dir = Path(out_dir)
    if out_dir.exists() and not out_dir.is_dir():
        raise OutputError(f"{out_dir}: exists and is not a directory")
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise OutputError(f"{out_dir}: cannot create the output directory: {err.strerror or err}") from None
    paths = {key: out_dir / name for key, name in PHANTOM_FILES.items()}
    try:
        text = json.dumps(case.params, indent=1, sort_keys=True, allow_nan=False)
    except (TypeError, ValueError) as err:
        raise OutputError(f"phantom parameters are not JSON-serialisable: {err}") from None
    imageio.write_image(case.spect, paths["spect"])
    imageio.write_image(case.ct, paths["ct"])
    imageio.write_image(case.truth, paths["truth"])
    with imageio.atomic_path(paths["params"]) as tmp:
        tmp.write_text(text + "\n", encoding="utf-8")
    return paths


def phantom_command(
    out: str,
    seed: int,
    count: int = 1,
    from_ct: Optional[str] = None,
    bone_labels: Optional[str] = None,
    shifted: bool = False,
    osem: bool = False,
    progress: Optional[ProgressCallback] = None,
) -> List[Dict[str, Path]]:
    """``fcmseg phantom``: write ``out/case_<seed>/`` for seeds ``seed .. seed+count-1``.

    Procedural phantoms by default; with ``from_ct`` (a CT file or DICOM directory) and ``bone_labels``
    (a 0/1 bone mask or a TotalSegmentator label map) CT-derived ones. ``shifted`` draws from
    :data:`SHIFTED_RANGES` instead of :data:`TRAINING_RANGES`; ``osem`` reconstructs every SPECT by OS-EM from
    noisy projections (``reconstruction``) instead of image-space noise. Returns each case's file paths.
    """
    seed = check_seed(seed)
    if isinstance(count, bool) or not isinstance(count, (int, np.integer)) or count < 1:
        raise InputError(f"count must be a positive integer, got {count!r}")
    if (from_ct is None) != (bone_labels is None):
        raise InputError("--from-ct and --bone-labels go together: give both (or neither for procedural phantoms)")
    ranges = SHIFTED_RANGES if shifted else TRAINING_RANGES
    if osem:
        ranges = dataclasses.replace(ranges, osem_probability=1.0)
    out_path = Path(out)
    if out_path.exists() and not out_path.is_dir():
        raise OutputError(f"{out_path}: exists and is not a directory")
    ct_img = labels_img = None
    if from_ct is not None:
        report(progress, 0.0, "reading CT and labels")
        ct_img = imageio.read_image(from_ct)
        labels_img = imageio.read_image(bone_labels)
    kind = "procedural" if ct_img is None else "ct"
    written = []
    for i in range(int(count)):
        s = seed + i
        report(progress, i / count, f"phantom {i + 1}/{count} (seed {s})")
        start = time.perf_counter()
        case = generate_phantom(s, kind, ranges, ct=ct_img, bone_labels=labels_img)
        case.params["generation_seconds"] = rounded(time.perf_counter() - start, 3)
        written.append(write_phantom(case, out_path / f"case_{s}"))
    report(progress, 1.0, f"wrote {count} phantom(s) to {out_path}")
    return written
