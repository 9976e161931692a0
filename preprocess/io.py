"""Read any CT (.mha/.mhd, .nii/.nii.gz, .nrrd, a DICOM series folder) into (volume_zyx, Geometry); write label maps.

SimpleITK reads the pixels of image files and of each DICOM slice (it applies the DICOM rescale
slope/intercept and decodes JPEG 2000 / JPEG-LS through GDCM); pydicom reads the DICOM headers and
preprocess/dicom.py owns the series logic (selection, ordering, gaps).
"""

from __future__ import annotations

import gzip
import os
import tempfile
import zlib
from pathlib import Path

import numpy as np
import SimpleITK as sitk

from preprocess.errors import InputError, OutputError
from preprocess.geometry import Geometry

IMAGE_SUFFIXES = (".mha", ".mhd", ".nii", ".nii.gz", ".nrrd", ".nhdr")
_REAL_PIXEL_IDS = {
    sitk.sitkInt8, sitk.sitkUInt8, sitk.sitkInt16, sitk.sitkUInt16, sitk.sitkInt32, sitk.sitkUInt32,
    sitk.sitkInt64, sitk.sitkUInt64, sitk.sitkFloat32, sitk.sitkFloat64,
}


def is_image_file(path: Path) -> bool:
    name = path.name.lower()
    return path.is_file() and name.endswith(IMAGE_SUFFIXES)


def verify_gzip(path: Path) -> None:
    """Decompress a gzip file end to end (streaming) so a truncated or corrupt one fails loudly.

    SimpleITK reads a truncated .nii.gz without an error and returns garbage voxels.
    """
    try:
        with gzip.open(path, "rb") as stream:
            while stream.read(1 << 22):
                pass
    except (OSError, EOFError, zlib.error) as error:
        raise InputError(f"{path}: corrupt or truncated gzip data ({error})") from None


def read_image(path: Path) -> sitk.Image:
    """Read one image file with SimpleITK, checking gzip integrity first."""
    path = Path(path)
    if not path.exists():
        raise InputError(f"{path}: no such file")
    if path.stat().st_size == 0:
        raise InputError(f"{path}: file is empty")
    if path.name.lower().endswith(".gz"):
        verify_gzip(path)
    try:
        return sitk.ReadImage(str(path))
    except RuntimeError as error:
        reason = str(error).strip().splitlines()[-1] if str(error).strip() else "unreadable"
        raise InputError(f"{path}: cannot be read as an image ({reason[:200]})") from None


def check_ct_image(image: sitk.Image, source: Path) -> None:
    """Refuse images that cannot be a CT volume: not 3D, not scalar, not real-valued."""
    if image.GetDimension() != 3:
        raise InputError(f"{source}: expected a 3D image, got {image.GetDimension()}D of size {image.GetSize()}")
    if image.GetNumberOfComponentsPerPixel() != 1:
        raise InputError(f"{source}: expected scalar voxels, got {image.GetNumberOfComponentsPerPixel()} components")
    if image.GetPixelID() not in _REAL_PIXEL_IDS:
        raise InputError(f"{source}: unsupported pixel type {image.GetPixelIDTypeAsString()}")
    if min(image.GetSize()) < 1 or image.GetSize()[0] < 8 or image.GetSize()[1] < 8:
        raise InputError(f"{source}: image of size {image.GetSize()} is too small to be an axial CT")
    if any(not np.isfinite(s) or s <= 0 for s in image.GetSpacing()):
        raise InputError(f"{source}: invalid voxel spacing {image.GetSpacing()}")


def to_hu_array(image: sitk.Image, source: Path) -> np.ndarray:
    """Return the voxels as HU in a (z, y, x) array: int16 when the values fit, else float32."""
    volume = sitk.GetArrayFromImage(image)
    if np.issubdtype(volume.dtype, np.floating):
        if not np.isfinite(volume).all():
            raise InputError(f"{source}: image holds NaN or infinite voxels")
        volume = volume.astype(np.float32, copy=False)
    elif volume.dtype != np.int16:
        low, high = volume.min(), volume.max()
        if low >= np.iinfo(np.int16).min and high <= np.iinfo(np.int16).max:
            volume = volume.astype(np.int16)
        else:
            volume = volume.astype(np.float32)
    return volume


def read_ct(path: Path) -> tuple[np.ndarray, Geometry]:
    """Read a CT from an image file or a DICOM series folder as HU (volume_zyx, Geometry)."""
    path = Path(path)
    if path.is_dir():
        from preprocess.dicom import read_dicom_series

        return read_dicom_series(path)
    if not path.exists():
        raise InputError(f"{path}: no such file or folder")
    if not path.name.lower().endswith(IMAGE_SUFFIXES):
        raise InputError(f"{path}: unsupported file type (expected one of {', '.join(IMAGE_SUFFIXES)} or a DICOM folder)")
    image = read_image(path)
    check_ct_image(image, path)
    return to_hu_array(image, path), Geometry.from_image(image)


def case_id(path: Path) -> str:
    """Case name of an input path: file name without its image suffix, or the folder name."""
    name = Path(path).name
    for suffix in sorted(IMAGE_SUFFIXES, key=len, reverse=True):
        if name.lower().endswith(suffix):
            return name[: -len(suffix)]
    return name


def write_label_map(labels_zyx: np.ndarray, geometry: Geometry, path: Path) -> None:
    """Write a uint8 label map on `geometry`'s grid, compressed, atomically (temp file + rename)."""
    path = Path(path)
    if labels_zyx.shape != geometry.shape_zyx:
        raise ValueError(f"label map shape {labels_zyx.shape} does not match geometry {geometry.shape_zyx}")
    image = geometry.apply_to(sitk.GetImageFromArray(np.ascontiguousarray(labels_zyx, dtype=np.uint8)))
    write_image_atomically(image, path)


def write_image_atomically(image: sitk.Image, path: Path) -> None:
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        handle, temp = tempfile.mkstemp(prefix=".partial-", suffix="".join(path.suffixes), dir=path.parent)
        os.close(handle)
    except OSError as error:
        raise OutputError(f"{path.parent}: cannot write output ({error.strerror})") from None
    try:
        sitk.WriteImage(image, temp, useCompression=True)
        os.chmod(temp, 0o644)  # mkstemp makes 0600: readers of the output are often another user
        os.replace(temp, path)
    except (RuntimeError, OSError) as error:
        Path(temp).unlink(missing_ok=True)
        raise OutputError(f"{path}: cannot write image ({str(error).strip().splitlines()[-1][:200]})") from None
