"""The vertebral body centre on each axial slice, from a vertebra label map on the CT grid.

A vertebra label (TotalSegmentator's, for instance) covers the whole vertebra: body, pedicles, laminae,
transverse and spinous processes. The body is its thickest part. On each slice, the body centre is the
centroid of the vertebra's *core*: the voxels of the slice's own vertebra that lie farther than
CORE_FRACTION x (its largest inscribed radius) from its edge, in the connected piece that holds the
deepest point. The thin posterior elements (lamina, processes: a few mm thick) have no core; for a
convex, roughly symmetric body the core's centroid is the body's centroid. A slice whose vertebra has
an inscribed radius under MIN_BODY_RADIUS_MM (a disc space, where only posterior elements are labelled)
gets no centre (NaN), and so no moment arms.

All of it is vectorised over slices: one 3D distance transform whose slice spacing is so large that the
nearest background is always found in-plane, one connected-component labelling with an in-plane structure.
"""

from __future__ import annotations

import numpy as np
from scipy import ndimage

CORE_FRACTION = 0.6
MIN_BODY_RADIUS_MM = 7.0
_FAR_MM = 1.0e6  # spacing along z for the distance transform: no background is ever found across slices


def body_centres_mm(vertebrae_zyx: np.ndarray, slice_vertebra: np.ndarray, *, pixel_spacing_mm: tuple[float, float]) -> np.ndarray:
    """(n_slices, 2) body centre of each slice as (x_mm, y_mm) from voxel (0, 0) of the slice; NaN where none.

    `vertebrae_zyx` holds vertebra ids per voxel (0: none) on slices of an axial (LPS-ordered) volume,
    `slice_vertebra` the id each slice belongs to (0: none); only that vertebra's voxels count on a slice.
    `pixel_spacing_mm` is (x, y).
    """
    n_slices = vertebrae_zyx.shape[0]
    centres = np.full((n_slices, 2), np.nan)
    mask = (vertebrae_zyx == slice_vertebra[:, None, None]) & (slice_vertebra[:, None, None] > 0)
    if not mask.any():
        return centres
    # crop in-plane to the spine (with a one-voxel border of background) to keep the transform small
    ys, xs = np.nonzero(mask.any(axis=0))
    y0, y1 = max(ys.min() - 1, 0), ys.max() + 2
    x0, x1 = max(xs.min() - 1, 0), xs.max() + 2
    crop = np.pad(mask[:, y0:y1, x0:x1], ((0, 0), (1, 1), (1, 1)))
    sx, sy = pixel_spacing_mm
    depth = ndimage.distance_transform_edt(crop, sampling=(_FAR_MM, sy, sx))
    depth = np.where(crop, depth, 0.0)
    radius = depth.reshape(n_slices, -1).max(axis=1)
    core = (depth >= CORE_FRACTION * radius[:, None, None]) & crop & (radius[:, None, None] >= MIN_BODY_RADIUS_MM)
    in_plane = np.zeros((3, 3, 3), dtype=bool)
    in_plane[1] = ndimage.generate_binary_structure(2, 1)
    pieces, n_pieces = ndimage.label(core, structure=in_plane)
    if n_pieces == 0:
        return centres
    deepest = depth.reshape(n_slices, -1).argmax(axis=1)
    chosen = pieces.reshape(n_slices, -1)[np.arange(n_slices), deepest]  # 0 where the slice has no core
    keep = np.zeros(n_pieces + 1, dtype=bool)
    keep[chosen[chosen > 0]] = True
    z, y, x = np.nonzero(keep[pieces])
    counts = np.bincount(z, minlength=n_slices)
    found = counts > 0
    # back to uncropped voxel coordinates (the pad added one voxel), then to mm
    mean_x = np.bincount(z, weights=x, minlength=n_slices)[found] / counts[found] - 1 + x0
    mean_y = np.bincount(z, weights=y, minlength=n_slices)[found] / counts[found] - 1 + y0
    centres[found, 0] = mean_x * sx
    centres[found, 1] = mean_y * sy
    return centres
