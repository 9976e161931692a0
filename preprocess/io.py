"""Read any CT (.mha/.mhd, .nii/.nii.gz, .nrrd, a DICOM series folder) into (volume_zyx, Geometry); write label maps.

SimpleITK reads the pixels of image files and of each DICOM slice (it applies the DICOM rescale
slope/intercept and decodes JPEG 2000 / JPEG-LS through GDCM); pydicom reads the DICOM headers and
preprocess/dicom.py owns the series logic (selection, ordering, gaps).
"""

from __future__ import annotations

import gzip
import os
import struct
import zlib
from pathlib import Path
from typing import Callable

import numpy as np
import SimpleITK as sitk

from common.atomic import atomic_path
from common.errors import InputError, OutputError
from preprocess.geometry import Geometry
from preprocess.intensity import check_hu_range

IMAGE_SUFFIXES = (".mha", ".mhd", ".nii", ".nii.gz", ".nrrd", ".nhdr")
_REAL_PIXEL_IDS = {
    sitk.sitkInt8, sitk.sitkUInt8, sitk.sitkInt16, sitk.sitkUInt16, sitk.sitkInt32, sitk.sitkUInt32,
    sitk.sitkInt64, sitk.sitkUInt64, sitk.sitkFloat32, sitk.sitkFloat64,
}


def is_image_file(path: Path) -> bool:
    name = path.name.lower()
    return path.is_file() and name.endswith(IMAGE_SUFFIXES)


def verify_gzip(path: Path, *, max_bytes: int | None = None) -> int:
    """Decompress a gzip file end to end (streaming) so a truncated or corrupt one fails loudly.

    SimpleITK reads a truncated .nii.gz without an error and returns garbage voxels. With `max_bytes`
    (what the header says the file holds, plus slack) a gzip bomb is refused once it inflates past it.
    Returns the number of bytes it inflates to.
    """
    total = 0
    try:
        with gzip.open(path, "rb") as stream:
            while block := stream.read(1 << 22):
                total += len(block)
                if max_bytes is not None and total > max_bytes:
                    raise InputError(
                        f"{path}: gzip data inflates past {max_bytes / 2**20:.0f} MiB, more than its header declares: refused (gzip bomb?)"
                    )
    except (OSError, EOFError, zlib.error) as error:
        raise InputError(f"{path}: corrupt or truncated gzip data ({error})") from None
    return total


def _nifti_extent(head: bytes) -> tuple[int, int] | None:
    """(vox_offset, bytes of voxel data) that a single-file NIfTI-1 header declares, from its first 348 bytes.

    Only NIfTI-1 gets here: check_nifti_header refuses NIfTI-2 (SimpleITK cannot read it) and anything else.
    """
    for order in "<>":
        if len(head) < 348 or struct.unpack(f"{order}i", head[:4])[0] != 348:
            continue
        dims = struct.unpack(f"{order}8h", head[40:56])
        bitpix = struct.unpack(f"{order}h", head[72:74])[0]
        raw_offset = struct.unpack(f"{order}f", head[108:112])[0]
        if not np.isfinite(raw_offset) or not 0 <= raw_offset < 2**40:
            return None  # left to SimpleITK, which then refuses or reads from its own idea of the offset
        offset = max(352, int(raw_offset))
        if not 1 <= dims[0] <= 7 or bitpix <= 0:
            return None
        voxels = 1
        for n in dims[1 : dims[0] + 1]:
            voxels *= max(1, int(n))
        return offset, voxels * bitpix // 8
    return None


#: where a NIfTI-1 header keeps its geometry: per part, (offset and format of its code, or None where always in use;
#: offset and format of its numbers), the byte order left out
_NIFTI1_GEOMETRY = {"pixdim": (None, (80, "3f")), "qform": ((252, "h"), (256, "6f")), "sform": ((254, "h"), (280, "12f"))}


def check_nifti_header(path: Path) -> None:
    """Refuse a .nii/.nii.gz whose header is not NIfTI-1, or whose spacing or transform in use is not finite.

    ITK's NIfTI reader hangs (no error, no end) on a header whose sform, in use, holds a NaN (found by the
    image fuzz target); nothing else in such a file can be trusted either. A single-file NIfTI whose vox_offset
    is not a finite number of at least 352 is refused too: ITK reads such a file from another offset, and the
    voxels come out shifted without an error. NIfTI-2 is refused by name: SimpleITK has no reader for it.
    """
    try:
        with (gzip.open if path.name.lower().endswith(".gz") else open)(path, "rb") as stream:
            head = stream.read(348)
    except (OSError, EOFError, zlib.error) as error:
        raise InputError(f"{path}: corrupt or truncated gzip data ({error})") from None
    sizes = {order: struct.unpack(f"{order}i", head[:4])[0] for order in "<>"} if len(head) >= 4 else {}
    if 540 in sizes.values():
        raise InputError(f"{path}: cannot be read as an image (NIfTI-2, which SimpleITK has no reader for: convert it to NIfTI-1 or .mha)")
    order = next((order for order, size in sizes.items() if size == 348), None)
    if order is None or len(head) < 348:
        raise InputError(f"{path}: cannot be read as an image (not a NIfTI-1 header: its first 4 bytes do not say 348, or it is shorter)")
    for name, (code, (at, number_format)) in _NIFTI1_GEOMETRY.items():
        if code is not None and struct.unpack_from(f"{order}{code[1]}", head, code[0])[0] <= 0:
            continue  # this transform is not in use
        if not np.isfinite(struct.unpack_from(f"{order}{number_format}", head, at)).all():
            raise InputError(f"{path}: its NIfTI header's {name} holds a non-finite number: refused")
    vox_offset = struct.unpack_from(f"{order}f", head, 108)[0]
    if head[344:348] == b"n+1\0" and not (np.isfinite(vox_offset) and vox_offset >= 352):
        # ITK then reads the voxels from an offset of its own choosing: shifted, finite, wrong (found by fixing a test)
        raise InputError(f"{path}: its NIfTI header's vox_offset is {vox_offset}, not a position at or after the 352-byte header: refused")


def _check_nifti_complete(path: Path, *, inflated_bytes: int | None) -> None:
    """SimpleITK reads a short NIfTI (a truncated .nii, or a .nii.gz made from one) without an error: check the length."""
    opener = gzip.open if inflated_bytes is not None else open
    with opener(path, "rb") as stream:
        extent = _nifti_extent(stream.read(348))
    if extent is None:
        return  # not a header we know: SimpleITK's own checks apply
    length = inflated_bytes if inflated_bytes is not None else path.stat().st_size
    if length < sum(extent):
        raise InputError(f"{path}: truncated NIfTI: {length} bytes where its header needs {sum(extent)}")


def _reason(error: Exception, limit: int = 200) -> str:
    text = str(error).strip()
    return (text.splitlines()[-1] if text else type(error).__name__)[:limit]


_DETACHABLE_SUFFIXES = (".mha", ".mhd", ".nrrd", ".nhdr")


#: the dimension counts ITK reads (itk::ImageIOBase); its MetaImage reader crashes on NDims >= 100 or < 0 (fuzzing)
_MAX_IO_DIMENSION = 5


def check_detached_header(path: Path) -> None:
    """The fields of a MetaImage/NRRD header that ITK must not see unchecked.

    A header may name its voxel data file: it must be a regular file beside the header. Refuses what
    would make the reader leave the input folder (an absolute path, `..`, a symlink out), read a device
    or a FIFO (a hang), or follow a list or a file-name pattern. A MetaImage's NDims must be a count
    ITK reads (1-5): ITK's MetaImage reader dies of a segmentation fault on a large or negative one; and
    every line of a MetaImage header up to its data must be a `Key = Value` pair without a NUL byte.
    """
    with open(path, "rb") as stream:
        head = stream.read(1 << 16)
    metaimage = path.name.lower().endswith((".mha", ".mhd"))
    for number, raw in enumerate(head.split(b"\n"), start=1):
        line = raw.decode("latin-1").strip()
        if not metaimage and not line:
            return  # the end of an NRRD header
        key, separator, value = line.partition("=" if metaimage else ":")
        key, value = key.strip().lower(), value.strip()
        if metaimage and line and (not separator or "\0" in line):
            # MetaIO reads a key up to its "=", across line ends, and compares it as a C string (up to a NUL): a line
            # "NDims<NUL>..." took a later line's "= 306" as NDims and crashed ITK (SIGSEGV; found by the image target)
            raise InputError(f"{path}: line {number} is no 'Key = Value' pair without NUL bytes: not a MetaImage header ITK may read")
        if metaimage and separator and key == "ndims":
            count = value.split()[0] if value.split() else ""
            if not (count.isascii() and count.isdigit()) or not 1 <= int(count) <= _MAX_IO_DIMENSION:  # "²" is a digit to str
                raise InputError(f"{path}: its MetaImage header says NDims = {value[:40]!r}, not a dimension count (1-{_MAX_IO_DIMENSION})")
        if not separator or key not in (("elementdatafile",) if metaimage else ("data file", "datafile")):
            continue
        if metaimage and value.upper() == "LOCAL":
            return
        if value.upper().startswith("LIST") or "%" in value or (not metaimage and " " in value):
            raise InputError(f"{path}: the header names its data as a list or pattern ({value[:80]!r}): not supported")
        data = path.parent / value
        try:
            resolved, folder = data.resolve(), path.parent.resolve()
        except (OSError, ValueError, RuntimeError) as error:
            raise InputError(f"{path}: cannot resolve its data file {value[:80]!r} ({error})") from None
        if Path(value).is_absolute() or folder not in resolved.parents:
            raise InputError(f"{path}: its data file {value[:80]!r} lies outside the header's folder: refused")
        try:
            regular = resolved.is_file()
        except (OSError, ValueError):  # a name too long for the file system, say
            regular = False
        if not regular:
            raise InputError(f"{path}: its data file {value[:80]!r} is missing or not a regular file")
        return


def read_image_header(path: Path) -> sitk.ImageFileReader:
    """A reader that has read only the header of `path` (size, pixel type, geometry): no voxel is decoded."""
    path = Path(path)
    if not path.exists():
        raise InputError(f"{path}: no such file")
    if not path.is_file():
        raise InputError(f"{path}: not a regular file")
    if path.stat().st_size == 0:
        raise InputError(f"{path}: file is empty")
    if path.name.lower().endswith(_DETACHABLE_SUFFIXES):
        check_detached_header(path)
    if path.name.lower().endswith((".nii", ".nii.gz")):
        check_nifti_header(path)
    reader = sitk.ImageFileReader()
    reader.SetFileName(str(path))
    try:
        reader.ReadImageInformation()
    except RuntimeError as error:
        raise InputError(f"{path}: cannot be read as an image ({_reason(error)})") from None
    return reader


def _stored_bytes_per_voxel(reader: sitk.ImageFileReader) -> int:
    pixel = sitk.Image([1] * reader.GetDimension(), reader.GetPixelID(), reader.GetNumberOfComponents())
    return max(1, pixel.GetSizeOfPixelComponent()) * reader.GetNumberOfComponents()


def _voxel_count(size) -> int:
    count = 1
    for n in size:
        count *= int(n)
    return count


def read_image(path: Path) -> sitk.Image:
    """Read one image file with SimpleITK, checking gzip integrity first (bounded by the header's size)."""
    path = Path(path)
    reader = read_image_header(path)
    return _read_pixels(reader, path)


def _read_pixels(reader: sitk.ImageFileReader, path: Path) -> sitk.Image:
    inflated = None
    if path.name.lower().endswith(".gz"):
        declared = _voxel_count(reader.GetSize()) * _stored_bytes_per_voxel(reader)
        inflated = verify_gzip(path, max_bytes=declared + 64 * 2**20)  # slack for headers and extensions
    if path.name.lower().endswith((".nii", ".nii.gz")):
        _check_nifti_complete(path, inflated_bytes=inflated)
    try:
        return reader.Execute()
    except (RuntimeError, MemoryError) as error:
        raise InputError(f"{path}: cannot be read as an image ({_reason(error)})") from None


def check_ct_header(reader: sitk.ImageFileReader, source: Path) -> None:
    """Refuse, from the header alone, images that cannot be a CT volume: not 3D, not scalar, not real-valued."""
    size = tuple(int(n) for n in reader.GetSize())
    dimension = reader.GetDimension()
    if dimension == 4 and size[3] == 1:
        pass  # a 3D volume stored with a trailing axis of one: SimpleITK reads it as 4D
    elif dimension != 3:
        raise InputError(f"{source}: expected a 3D image, got {dimension}D of size {size}")
    if reader.GetPixelID() in (sitk.sitkComplexFloat32, sitk.sitkComplexFloat64):
        raise InputError(f"{source}: unsupported pixel type {sitk.GetPixelIDValueAsString(reader.GetPixelID())} (expected real scalar HU)")
    if reader.GetNumberOfComponents() != 1:
        raise InputError(f"{source}: expected scalar voxels, got {reader.GetNumberOfComponents()} components per voxel")
    if reader.GetPixelID() not in _REAL_PIXEL_IDS:
        raise InputError(f"{source}: unsupported pixel type {sitk.GetPixelIDValueAsString(reader.GetPixelID())} (expected real scalar HU)")
    if min(size[:3]) < 1 or size[0] < 8 or size[1] < 8:
        raise InputError(f"{source}: image of size {size} is too small to be an axial CT")
    if any(not np.isfinite(s) or s <= 0 for s in reader.GetSpacing()[:3]):
        raise InputError(f"{source}: invalid voxel spacing {reader.GetSpacing()}")
    if not np.all(np.isfinite(reader.GetOrigin())) or not np.all(np.isfinite(reader.GetDirection())):
        raise InputError(f"{source}: origin or direction is not finite")
    if abs(np.linalg.det(np.asarray(reader.GetDirection(), dtype=float).reshape(dimension, dimension)[:3, :3])) < 1e-3:
        raise InputError(f"{source}: direction matrix is singular {reader.GetDirection()}")


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


#: check_size(size_xyz, stored_bytes_per_voxel=..., source=...) raises when a volume may not be read
SizeCheck = Callable[..., None]


def read_ct(path: Path, *, check_size: SizeCheck | None = None) -> tuple[np.ndarray, Geometry]:
    """Read a CT from an image file, a DICOM series folder or a series chosen in a study as HU (volume_zyx, Geometry).

    The header is read and checked first (dimension, pixel type, size and, with `check_size`, the
    memory budget), so that a volume that cannot be used is refused before a voxel is decoded.
    """
    if not isinstance(path, (str, os.PathLike)):  # a series a study chose (preprocess.dicom.DicomSeries, UnusableStudy)
        from preprocess.dicom import read_dicom_series

        return read_dicom_series(path, check_size=check_size)
    path = Path(path)
    if path.is_dir():
        from preprocess.dicom import read_dicom_series  # pydicom only where DICOM is read (the evaluation image has none)

        return read_dicom_series(path, check_size=check_size)
    if not path.exists():
        raise InputError(f"{path}: no such file or folder")
    if not path.name.lower().endswith(IMAGE_SUFFIXES):
        raise InputError(f"{path}: unsupported file type (expected one of {', '.join(IMAGE_SUFFIXES)} or a DICOM folder)")
    reader = read_image_header(path)
    check_ct_header(reader, path)
    if check_size is not None:
        check_size(tuple(int(n) for n in reader.GetSize()[:3]), stored_bytes_per_voxel=_stored_bytes_per_voxel(reader), source=path)
    image = _read_pixels(reader, path)
    if image.GetDimension() == 4:
        image = image[:, :, :, 0]
    check_ct_image(image, path)
    geometry = Geometry.from_image(image)
    volume = to_hu_array(image, path)
    del image
    check_hu_range(volume, path)
    return volume, geometry


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
    with atomic_path(path) as temp:
        try:
            sitk.WriteImage(image, str(temp), useCompression=True)
        except RuntimeError as error:
            raise OutputError(f"{path}: cannot write image ({_reason(error)})") from None
