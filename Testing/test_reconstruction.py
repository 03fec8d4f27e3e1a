"""SPECT by projection and OS-EM reconstruction (``phantoms/reconstruction.py``) and its use by the phantoms."""
import dataclasses
import math

import numpy as np
import pytest
import SimpleITK as sitk
import torch

from FCMSegmentationLib import phantoms as P
from FCMSegmentationLib.errors import InputError
from FCMSegmentationLib.phantoms import reconstruction as R

from conftest import load_script
from test_phantoms import small_ranges


def disc_volume(depth: int = 4, side: int = 40, radius: float = 10.0, centre=(20.0, 24.0)) -> torch.Tensor:
    rows, cols = torch.meshgrid(torch.arange(side, dtype=torch.float32), torch.arange(side, dtype=torch.float32),
                                indexing="ij")
    disc = (((rows - centre[0]) ** 2 + (cols - centre[1]) ** 2) <= radius ** 2).float()
    return disc.expand(depth, side, side).clone()


def angles(views: int):
    return [2.0 * math.pi * i / views for i in range(views)]


def test_projections_keep_the_counts_and_view_zero_sums_along_x():
    volume = disc_volume()
    grids = R._rotation_grids(angles(8), volume.shape[1])
    projections = R.forward_project(volume, grids)
    assert projections.shape == (8, 4, 40)
    np.testing.assert_allclose(projections.sum(dim=(1, 2)).numpy(), float(volume.sum()), rtol=0.02)
    np.testing.assert_allclose(projections[0].numpy(), volume.sum(dim=2).numpy(), atol=1e-4)  # no rotation
    # a quarter turn sums along the other in-plane axis (up to the direction of rotation)
    quarter = projections[2].numpy()
    along_y = volume.sum(dim=1).numpy()
    assert min(np.abs(quarter - along_y).max(), np.abs(quarter - along_y[:, ::-1]).max()) < 0.05 * along_y.max()


def test_back_projection_is_the_projectors_adjoint():
    generator = torch.Generator().manual_seed(0)
    volume = torch.rand(3, 32, 32, generator=generator) * disc_volume(3, 32, 12.0, (16.0, 16.0))
    data = torch.rand(12, 3, 32, generator=generator)
    grids = R._rotation_grids(angles(12), 32)
    inverse = R._rotation_grids([-a for a in angles(12)], 32)
    forward = float((R.forward_project(volume, grids) * data).sum())
    adjoint = float((volume * R.back_project(data, inverse)).sum())
    assert adjoint == pytest.approx(forward, rel=0.03)


def test_osem_recovers_a_noise_free_object_and_resolution_recovery_sharpens_it():
    sharp = disc_volume(side=48, radius=6.0, centre=(24.0, 24.0)) * 9.0 + disc_volume(side=48, radius=18.0,
                                                                                     centre=(24.0, 24.0))
    views = angles(32)
    side = sharp.shape[1]
    sigma = 1.5
    blurred = R._gaussian_blur(sharp, sigma)
    projections = R.forward_project(blurred, R._rotation_grids(views, side))
    plain = R.osem_reconstruct(projections, views, subsets=4, iterations=10)
    inside = disc_volume(side=48, radius=16.0, centre=(24.0, 24.0)).bool() & (torch.arange(4)[:, None, None] >= 1)
    inside &= torch.arange(4)[:, None, None] <= 2  # z edges lose counts to the blur's zero padding
    error = ((plain - blurred).abs()[inside].mean() / blurred[inside].mean()).item()
    assert error < 0.05
    recovered = R.osem_reconstruct(projections, views, subsets=4, iterations=10, psf_sigma_vox=sigma)
    centre = (slice(1, 3), 24, 24)
    assert recovered[centre].mean() > plain[centre].mean() * 1.05  # closer to the sharp object's 10
    assert recovered[centre].mean() <= sharp[centre].mean() * 1.1


def test_osem_spect_keeps_the_counts_and_gives_noise_correlated_between_neighbours():
    expected = np.zeros((6, 60, 70))
    rows, cols = np.mgrid[:60, :70]
    expected[:, ((rows - 30) / 25.0) ** 2 + ((cols - 35) / 30.0) ** 2 <= 1] = 40.0
    settings = R.OsemSettings(views=48, subsets=6, iterations=3, psf_model_fwhm_mm=0.0)
    osem = R.osem_spect(expected, 4.0, settings, np.random.default_rng(1))
    assert osem.shape == expected.shape and osem.dtype == np.float32 and osem.min() >= 0
    assert osem.sum() == pytest.approx(expected.sum(), rel=0.03)
    image_space = np.random.default_rng(1).poisson(expected).astype(np.float32)

    def neighbour_correlation(image):
        core = image[2:4, 20:40, 20:50]
        residual = core - core.mean()
        return float((residual[:, :, 1:] * residual[:, :, :-1]).mean() / residual.var())

    assert abs(neighbour_correlation(image_space)) < 0.1
    assert neighbour_correlation(osem) > 0.3
    again = R.osem_spect(expected, 4.0, settings, np.random.default_rng(1))
    np.testing.assert_array_equal(osem, again)
    empty = R.osem_spect(np.zeros((2, 8, 8)), 4.0, settings, np.random.default_rng(1))
    assert empty.shape == (2, 8, 8) and not empty.any()


def test_sampled_settings_follow_the_seed_the_probability_and_the_ranges():
    assert R.sample_osem(5, P.TRAINING_RANGES, 10.0)[0] is None  # the training ranges keep image-space noise
    ranges = dataclasses.replace(P.TRAINING_RANGES, osem_probability=1.0)
    drawn = [R.sample_osem(seed, ranges, 10.0)[0] for seed in range(40)]
    assert drawn[3] == R.sample_osem(3, ranges, 10.0)[0]
    assert all(60 <= s.views <= 120 and 4 <= s.subsets <= 10 and 2 <= s.iterations <= 6 for s in drawn)
    modelled = [s.psf_model_fwhm_mm for s in drawn if s.psf_model_fwhm_mm > 0]
    assert 5 < len(modelled) < 35 and all(5.0 <= fwhm <= 9.0 for fwhm in modelled)
    half = dataclasses.replace(P.TRAINING_RANGES, osem_probability=0.5)
    chosen = sum(R.sample_osem(seed, half, 10.0)[0] is not None for seed in range(200))
    assert 70 < chosen < 130
    with pytest.raises(InputError, match="osem_probability"):
        dataclasses.replace(P.TRAINING_RANGES, osem_probability=1.5).validate()


def test_an_osem_phantom_has_the_same_anatomy_and_another_spect():
    ranges = small_ranges(lesion_count=(1, 1))
    plain = P.procedural_phantom(4, ranges)
    osem = P.procedural_phantom(4, dataclasses.replace(ranges, osem_probability=1.0))
    for name in ("ct", "truth"):
        np.testing.assert_array_equal(sitk.GetArrayFromImage(getattr(plain, name)),
                                      sitk.GetArrayFromImage(getattr(osem, name)))
    plain_spect, osem_spect = (sitk.GetArrayFromImage(case.spect) for case in (plain, osem))
    assert plain_spect.shape == osem_spect.shape and not np.array_equal(plain_spect, osem_spect)
    assert osem_spect.sum() == pytest.approx(plain_spect.sum(), rel=0.05)
    assert plain.params["spect_reconstruction"] is None
    recorded = osem.params["spect_reconstruction"]
    assert set(recorded) == {"osem_views", "osem_subsets", "osem_iterations", "osem_psf_model_fwhm_mm"}
    differing = {"spect_reconstruction", "total_counts"}
    assert {k: v for k, v in osem.params.items() if k not in differing} == \
        {k: v for k, v in plain.params.items() if k not in differing}


def test_training_with_osem_spect_changes_the_spect_channel_and_keeps_ct_and_truth(tmp_path):
    from FCMSegmentationLib.training import TrainConfig, build_cases, phantom_plan

    plain = TrainConfig(out=str(tmp_path / "m.pt"), phantoms=1, seed=5)
    osem = TrainConfig(out=str(tmp_path / "m.pt"), phantoms=1, seed=5, osem_spect=1.0)
    (image_space,), (reconstructed,) = (build_cases(phantom_plan(config), config) for config in (plain, osem))
    assert not np.allclose(reconstructed.features[0], image_space.features[0])  # another SPECT
    np.testing.assert_array_equal(reconstructed.features[1:], image_space.features[1:])  # the same CT
    np.testing.assert_array_equal(reconstructed.labels, image_space.labels)  # and truth


def test_phantom_command_osem_flag_reconstructs_every_spect(tmp_path, monkeypatch):
    from FCMSegmentationLib.cli import build_parser
    from FCMSegmentationLib.phantoms import command

    seen = []
    small = P.procedural_phantom(5, small_ranges())

    def record(seed, kind, ranges, ct=None, bone_labels=None):
        seen.append(ranges)
        return small

    monkeypatch.setattr(command, "generate_phantom", record)
    P.phantom_command(str(tmp_path / "a"), seed=1, osem=True)
    P.phantom_command(str(tmp_path / "b"), seed=1, shifted=True, osem=True)
    P.phantom_command(str(tmp_path / "c"), seed=1)
    assert seen[0] == dataclasses.replace(P.TRAINING_RANGES, osem_probability=1.0)
    assert seen[1] == dataclasses.replace(P.SHIFTED_RANGES, osem_probability=1.0)
    assert seen[2] is P.TRAINING_RANGES
    assert build_parser().parse_args(["phantom", "--out", "d", "--seed", "1", "--osem"]).osem


def test_spect_chains_figure_shows_one_phantom_three_ways(tmp_path):
    render_spect_chains = load_script("render_spect_chains")
    images = render_spect_chains.spect_chains(3)
    chains = [images[title] for title in ("image-space Poisson noise", "OS-EM", "OS-EM, resolution recovery")]
    assert all(chain.shape == images["bone"].shape for chain in chains) and images["bone"].any()
    assert not np.array_equal(chains[0], chains[1]) and not np.array_equal(chains[1], chains[2])
    # the same counts, and the bone is where the SPECT is bright, in every chain
    assert chains[1].sum() == pytest.approx(chains[0].sum(), rel=0.05)
    assert all(chain[images["bone"]].mean() > 2 * chain[~images["bone"] & (chain > 0)].mean() for chain in chains)
    out = tmp_path / "chains.png"
    assert render_spect_chains.main(["--seed", "3", "--out", str(out)]) == 0
    assert out.stat().st_size > 10_000
