"""Reorientation to the model frame and back: array and geometry round trips on many frames."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import SimpleITK as sitk

from common.errors import InputError
from preprocess.geometry import Geometry, Reorientation

FRAMES = ["LPS", "RAS", "LAS", "RPI", "PIR", "ASL", "IRP", "SAR", "LPI"]


def _image(frame: str, seed: int = 0) -> sitk.Image:
    rng = np.random.default_rng(seed)
    image = sitk.GetImageFromArray(rng.integers(-1000, 1000, (5, 6, 7)).astype(np.int16))
    image.SetSpacing((0.7, 0.9, 2.5))
    image.SetOrigin((-12.5, 30.0, 104.0))
    return sitk.DICOMOrient(image, frame)  # same physical content, stored in `frame`


@pytest.mark.parametrize("frame", FRAMES)
def test_reorientation_round_trip_is_exact(frame):
    image = _image(frame)
    geometry = Geometry.from_image(image)
    volume = sitk.GetArrayFromImage(image)
    reorientation = Reorientation.between(geometry, "LPS")
    assert geometry.orientation_code() == frame
    restored = reorientation.invert(reorientation.apply(volume))
    np.testing.assert_array_equal(restored, volume)
    assert Geometry.from_image(geometry.apply_to(sitk.GetImageFromArray(restored))) == geometry


@pytest.mark.parametrize("frame", FRAMES)
def test_reoriented_voxels_sit_at_the_same_physical_points(frame):
    """Oracle: SimpleITK's DICOMOrient of the same image into LPS."""
    image = _image(frame)
    reorientation = Reorientation.between(Geometry.from_image(image), "LPS")
    ours = reorientation.apply(sitk.GetArrayFromImage(image))
    theirs = sitk.DICOMOrient(image, "LPS")
    np.testing.assert_array_equal(ours, sitk.GetArrayFromImage(theirs))
    np.testing.assert_allclose(reorientation.spacing_mm, theirs.GetSpacing())


@pytest.mark.parametrize("target", ["LPS", "RAS", "PIR"])
def test_any_target_frame_matches_simpleitk(target):
    image = _image("ASL", seed=3)
    reorientation = Reorientation.between(Geometry.from_image(image), target)
    np.testing.assert_array_equal(reorientation.apply(sitk.GetArrayFromImage(image)), sitk.GetArrayFromImage(sitk.DICOMOrient(image, target)))


def test_slightly_oblique_direction_maps_to_nearest_frame():
    angle = np.radians(8)
    rotation = np.array([[np.cos(angle), -np.sin(angle), 0], [np.sin(angle), np.cos(angle), 0], [0, 0, 1]])
    geometry = Geometry((4, 4, 4), (1.0, 1.0, 1.0), (0.0, 0.0, 0.0), tuple(rotation.ravel()))
    assert geometry.orientation_code() == "LPS"


def test_degenerate_direction_is_an_input_error():
    direction = (1.0, 1.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 1.0)
    with pytest.raises(InputError, match="no unique nearest axis"):
        Reorientation.between(Geometry((4, 4, 4), (1.0, 1.0, 1.0), (0.0, 0.0, 0.0), direction), "LPS")


def test_all_48_frames_have_a_reorientation():
    letters = [("L", "R"), ("P", "A"), ("S", "I")]
    count = 0
    for order in itertools.permutations(range(3)):
        for signs in itertools.product((0, 1), repeat=3):
            frame = "".join(letters[axis][sign] for axis, sign in zip(order, signs))
            image = _image(frame, seed=count)
            reorientation = Reorientation.between(Geometry.from_image(image), "LPS")
            np.testing.assert_array_equal(
                reorientation.apply(sitk.GetArrayFromImage(image)), sitk.GetArrayFromImage(sitk.DICOMOrient(image, "LPS"))
            )
            count += 1
    assert count == 48
