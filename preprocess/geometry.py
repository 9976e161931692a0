"""Image geometry as a frozen dataclass, and reorientation to the network's frame and back.

Axis conventions: ITK/SimpleITK order (x, y, z) for sizes, spacing and the direction matrix, whose
columns are the image axes in LPS physical space; numpy arrays are (z, y, x), named `*_zyx`.
Frame codes follow SimpleITK's DICOMOrient: "LPS" means axis x runs towards the patient's Left,
y towards Posterior, z towards Superior.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

from common.errors import InputError

if TYPE_CHECKING:  # for the annotations only: Geometry needs no SimpleITK at run time (the GPU benchmark machine has none)
    import SimpleITK as sitk

_LETTER_AXIS = {"L": (0, 1), "R": (0, -1), "P": (1, 1), "A": (1, -1), "S": (2, 1), "I": (2, -1)}
_AXIS_LETTERS = {0: ("R", "L"), 1: ("A", "P"), 2: ("I", "S")}


@dataclass(frozen=True)
class Geometry:
    """Where a 3D image lies in physical (LPS) space."""

    size_xyz: tuple[int, int, int]
    spacing_mm: tuple[float, float, float]
    origin_mm: tuple[float, float, float]
    direction: tuple[float, ...]  # 9 values, row-major, columns are the image axes

    @classmethod
    def from_image(cls, image: sitk.Image) -> "Geometry":
        return cls(
            size_xyz=tuple(int(s) for s in image.GetSize()),
            spacing_mm=tuple(float(s) for s in image.GetSpacing()),
            origin_mm=tuple(float(o) for o in image.GetOrigin()),
            direction=tuple(float(d) for d in image.GetDirection()),
        )

    def apply_to(self, image: sitk.Image) -> sitk.Image:
        """Stamp this geometry onto `image` (whose size must match) and return it."""
        if tuple(image.GetSize()) != self.size_xyz:
            raise ValueError(f"image size {image.GetSize()} does not match geometry {self.size_xyz}")
        image.SetSpacing(self.spacing_mm)
        image.SetOrigin(self.origin_mm)
        image.SetDirection(self.direction)
        return image

    @property
    def direction_matrix(self) -> np.ndarray:
        return np.asarray(self.direction, dtype=np.float64).reshape(3, 3)

    @property
    def shape_zyx(self) -> tuple[int, int, int]:
        return self.size_xyz[::-1]

    @property
    def voxel_volume_mm3(self) -> float:
        return float(np.prod(self.spacing_mm))

    def orientation_code(self) -> str:
        """Nearest three-letter frame code of this image (e.g. "LPS", "RAS", "LPI")."""
        physical_axes, signs = _nearest_physical_axes(self.direction_matrix)
        return "".join(_AXIS_LETTERS[a][s > 0] for a, s in zip(physical_axes, signs))


def _nearest_physical_axes(direction: np.ndarray) -> tuple[tuple[int, int, int], tuple[int, int, int]]:
    physical = np.argmax(np.abs(direction), axis=0)
    if sorted(physical.tolist()) != [0, 1, 2]:
        raise InputError(f"direction matrix {direction.ravel().tolist()} has no unique nearest axis frame")
    signs = np.sign(direction[physical, np.arange(3)]).astype(int)
    return tuple(int(p) for p in physical), tuple(int(s) for s in signs)


def parse_frame(frame: str) -> tuple[list[int], list[int]]:
    frame = frame.upper()
    if len(frame) != 3 or any(c not in _LETTER_AXIS for c in frame):
        raise ValueError(f"frame code {frame!r} is not three of L/R, P/A, S/I")
    axes = [_LETTER_AXIS[c][0] for c in frame]
    if sorted(axes) != [0, 1, 2]:
        raise ValueError(f"frame code {frame!r} names an axis twice")
    return axes, [_LETTER_AXIS[c][1] for c in frame]


@dataclass(frozen=True)
class Reorientation:
    """A permutation and flips of a (z, y, x) array that take an image into a target frame.

    `transpose` is applied first, then `flip_axes` (array axes of the transposed array).
    """

    source_frame: str
    target_frame: str
    transpose: tuple[int, int, int]
    flip_axes: tuple[int, ...]
    spacing_mm: tuple[float, float, float]  # (x, y, z) spacing in the target frame

    @classmethod
    def between(cls, geometry: Geometry, target_frame: str) -> "Reorientation":
        physical, signs = _nearest_physical_axes(geometry.direction_matrix)
        target_axes, target_signs = parse_frame(target_frame)
        # source image axis i (xyz order) carries physical axis physical[i]; target axis k wants target_axes[k]
        source_for_target = [physical.index(target_axes[k]) for k in range(3)]
        flips_xyz = [k for k in range(3) if signs[source_for_target[k]] != target_signs[k]]
        transpose = tuple(2 - source_for_target[2 - a] for a in range(3))  # numpy axes (z, y, x)
        return cls(
            source_frame=geometry.orientation_code(),
            target_frame=target_frame.upper(),
            transpose=transpose,
            flip_axes=tuple(sorted(2 - k for k in flips_xyz)),
            spacing_mm=tuple(geometry.spacing_mm[source_for_target[k]] for k in range(3)),
        )

    def apply(self, volume_zyx: np.ndarray) -> np.ndarray:
        """Return a view of `volume_zyx` in the target frame."""
        out = np.transpose(volume_zyx, self.transpose)
        return np.flip(out, self.flip_axes) if self.flip_axes else out

    def invert(self, volume_zyx: np.ndarray) -> np.ndarray:
        """Return a view of a target-frame array back in the source image's voxel order."""
        out = np.flip(volume_zyx, self.flip_axes) if self.flip_axes else volume_zyx
        return np.transpose(out, np.argsort(self.transpose))
