#!/usr/bin/env python3
"""Render one phantom's SPECT as each imaging chain of the simulator makes it: ``docs/figures/spect_chains.png``.

The same phantom (same anatomy, activity, camera blur and counts) three times: Poisson noise on each voxel
(the image-space chain), OS-EM from noisy projections, and OS-EM with resolution recovery
(``phantoms/reconstruction.py``); an axial and a coronal slice each, with the true bone's outline.

    python scripts/render_spect_chains.py [--seed N] [--out PATH]
"""
import argparse
import sys
from dataclasses import replace
from pathlib import Path
from typing import Any, Dict, List, Optional

import numpy as np
import SimpleITK as sitk

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "FCMSegmentation"))

import matplotlib  # noqa: E402

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

DEFAULT_OUT = REPO / "docs" / "figures" / "spect_chains.png"
DEFAULT_SEED = 20000  # a low-count phantom (45 counts per ml), where the textures differ most


def spect_chains(seed: int) -> Dict[str, Any]:
    """{chain's title: SPECT (z, y, x)} of procedural phantom ``seed``, plus ``"bone"``: its truth's bone
    (lesions included) on the SPECT grid, as the SPECT shows it (misregistration applied), and
    ``"settings"``: the OS-EM settings (the card's ``spect_reconstruction`` entry)."""
    from FCMSegmentationLib.phantoms import TRAINING_RANGES, misregistration_transform, procedural_phantom

    osem = replace(TRAINING_RANGES, osem_probability=1.0)
    cases = {
        "image-space Poisson noise": procedural_phantom(seed),
        "OS-EM": procedural_phantom(seed, replace(osem, osem_resolution_recovery_probability=0.0)),
        "OS-EM, resolution recovery": procedural_phantom(seed, replace(osem, osem_resolution_recovery_probability=1.0)),
    }
    images = {title: sitk.GetArrayFromImage(case.spect) for title, case in cases.items()}
    first = cases["image-space Poisson noise"]
    moved = sitk.Resample(first.truth, first.spect, misregistration_transform(first.params),
                          sitk.sitkNearestNeighbor, 0)
    images["bone"] = sitk.GetArrayFromImage(moved) > 0
    images["settings"] = cases["OS-EM, resolution recovery"].params["spect_reconstruction"]
    return images


def render(images: Dict[str, Any], out: Path) -> Path:
    """Axial and coronal slices through the bone's centre, one column per chain, one grey scale."""
    bone = images["bone"]
    z, y, _ = (int(round(c)) for c in np.argwhere(bone).mean(axis=0))
    titles: List[str] = [key for key in images if key not in ("bone", "settings")]
    top = float(np.percentile(images[titles[0]], 99.5))
    figure, axes = plt.subplots(2, len(titles), figsize=(4.2 * len(titles), 7.5), squeeze=False)
    for column, title in enumerate(titles):
        for row, (plane, mask) in enumerate(((images[title][z], bone[z]), (images[title][:, y], bone[:, y]))):
            axis = axes[row, column]
            axis.imshow(plane, cmap="gray", vmin=0, vmax=top, origin="lower" if row else "upper")
            axis.contour(mask, levels=[0.5], colors="tab:orange", linewidths=0.6)  # drawn in imshow's orientation
            axis.set_xticks([])
            axis.set_yticks([])
        axes[0, column].set_title(title)
    axes[0, 0].set_ylabel("axial")
    axes[1, 0].set_ylabel("coronal")
    settings = images["settings"]
    figure.suptitle(f"One phantom, three SPECT imaging chains (orange: true bone). OS-EM: {settings['osem_views']} "
                    f"views, {settings['osem_subsets']} subsets x {settings['osem_iterations']} iterations")
    figure.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(out, dpi=80)
    plt.close(figure)
    return out


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seed", type=int, default=DEFAULT_SEED, help="procedural phantom seed")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help="PNG to write")
    args = parser.parse_args(argv)
    print(f"wrote {render(spect_chains(args.seed), args.out)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
