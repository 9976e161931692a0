"""Read ground truth in full and, from each prediction, only the slices a reader annotated.

Arrays are (slice, row, col) stacks of the annotated axial slices, in file index order, holding
compact label codes: 0 background, 1..K the scored labels in value order, K+1 unannotated.
The axial axis is the image axis whose direction is nearest the patient's superior-inferior axis.

Reading strategy (measured in benchmarks/bench_evaluation.py): a prediction on the ground truth's
grid is read slice by slice through ImageFileReader's extract region where the format streams
(.nii, .nii.gz, uncompressed .mha/.mhd: a seek per slice), and in full otherwise: for compressed
.mha (what Grand Challenge stores) ITK's region read inflates from the start of the data and is
slower than one full read. A prediction on another grid is read in full and resampled (nearest
neighbour) onto the annotated slices of the ground-truth grid.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import SimpleITK as sitk

from evaluation.errors import CaseError, InputError
from evaluation.labels import LabelSet
from preprocess.geometry import Geometry
from preprocess.io import read_image, read_image_header, verify_gzip

_INTEGER_PIXEL_IDS = {
    sitk.sitkInt8, sitk.sitkUInt8, sitk.sitkInt16, sitk.sitkUInt16, sitk.sitkInt32, sitk.sitkUInt32,
    sitk.sitkInt64, sitk.sitkUInt64,
}
_FLOAT_PIXEL_IDS = {sitk.sitkFloat32, sitk.sitkFloat64}
_STREAMING_SUFFIXES = (".nii", ".nii.gz", ".mhd")  # .mha streams only when uncompressed (checked per file)
_META_ELEMENT_BYTES = {
    "MET_CHAR": 1, "MET_UCHAR": 1, "MET_SHORT": 2, "MET_USHORT": 2, "MET_INT": 4, "MET_UINT": 4,
    "MET_LONG": 4, "MET_ULONG": 4, "MET_LONG_LONG": 8, "MET_ULONG_LONG": 8, "MET_FLOAT": 4, "MET_DOUBLE": 8,
}
# Two grids are the same when they differ by less than this (NIfTI stores geometry as float32).
SPACING_RTOL = 1e-4
ORIGIN_TOL_VOXELS = 1e-2
DIRECTION_ATOL = 1e-4


@dataclass(frozen=True)
class AnnotatedSlices:
    """The annotated axial slices of one ground-truth volume, as compact codes."""

    geometry: Geometry
    axial_axis_xyz: int  # image axis (x=0, y=1, z=2) of the slice stack
    slice_indices: np.ndarray  # (S,) int index along the axial axis, ascending
    z_mm: np.ndarray  # (S,) physical superior-inferior coordinate of each slice centre
    codes_syx: np.ndarray  # (S, rows, cols) uint8/uint16 codes; K+1 where unannotated
    pixel_spacing_mm: tuple[float, float]  # (row, col) spacing of a slice
    mode: str  # "ignore-value" or "foreground-slices"
    unannotated_code: int  # K+1

    @property
    def n_slices(self) -> int:
        return int(self.slice_indices.size)


@dataclass(frozen=True)
class PredictionSlices:
    codes_syx: np.ndarray  # (S, rows, cols) codes 0..K on the ground truth's annotated slices
    grid: str  # "same" or "resampled"
    coverage: float  # fraction of annotated voxels inside the prediction's field of view
    read: str  # how it was read: "slices" or "full"


def axial_axis_xyz(geometry: Geometry) -> int:
    """The image axis whose direction has the largest superior-inferior component."""
    return int(np.argmax(np.abs(geometry.direction_matrix[2, :])))


def in_plane_spacing_mm(geometry: Geometry, axial_xyz: int) -> tuple[float, float]:
    """(row, col) pixel spacing of a slice once the axial axis is moved first in a (z, y, x) array."""
    numpy_axes = [a for a in range(3) if a != 2 - axial_xyz]  # remaining numpy axes, in order
    return tuple(float(geometry.spacing_mm[2 - a]) for a in numpy_axes)


def same_grid(a: Geometry, b: Geometry) -> bool:
    """True when voxel (i, j, k) of `a` and of `b` are the same physical voxel (within float32 rounding)."""
    if a.size_xyz != b.size_xyz:
        return False
    spacing_a, spacing_b = np.asarray(a.spacing_mm), np.asarray(b.spacing_mm)
    if not np.allclose(spacing_a, spacing_b, rtol=SPACING_RTOL, atol=0):
        return False
    if np.max(np.abs(np.asarray(a.origin_mm) - np.asarray(b.origin_mm))) > ORIGIN_TOL_VOXELS * float(spacing_a.min()):
        return False
    return bool(np.allclose(a.direction, b.direction, rtol=0, atol=DIRECTION_ATOL))


def code_table(label_set: LabelSet, *, with_ignore: bool) -> np.ndarray:
    """Lookup table value -> code: 0 -> 0, label value -> 1..K, ignore -> K+1, anything else -> 65535."""
    size = max(label_set.max_value, label_set.ignore if with_ignore else 0) + 1
    table = np.full(size, 65535, dtype=np.uint16)
    table[0] = 0
    table[np.asarray(label_set.values)] = np.arange(1, len(label_set.values) + 1)
    if with_ignore:
        table[label_set.ignore] = len(label_set.values) + 1
    return table


def _check_label_image(image_or_reader, path: Path, what: str) -> None:
    dimension = image_or_reader.GetDimension()
    if dimension != 3:
        raise InputError(f"{path}: expected a 3D {what}, got a {dimension}D image of size {tuple(image_or_reader.GetSize())}")
    if isinstance(image_or_reader, sitk.Image):
        components = image_or_reader.GetNumberOfComponentsPerPixel()
    else:
        components = image_or_reader.GetNumberOfComponents()
    if components != 1:
        raise InputError(f"{path}: expected one label value per voxel, got vector voxels")
    pixel_id = image_or_reader.GetPixelID()
    if pixel_id not in _INTEGER_PIXEL_IDS | _FLOAT_PIXEL_IDS:
        raise InputError(f"{path}: unsupported pixel type for a {what} ({sitk.GetPixelIDValueAsString(pixel_id)})")


def _integral(values: np.ndarray, path: Path) -> np.ndarray:
    """Integer view of label voxels; float voxels must hold whole numbers (e.g. 0.0/1.0 masks)."""
    if np.issubdtype(values.dtype, np.integer):
        return values
    if not np.isfinite(values).all():
        raise InputError(f"{path}: label volume holds NaN or infinite values")
    rounded = np.rint(values)
    if not np.array_equal(rounded, values):
        bad = np.unique(values[rounded != values])[:5]
        raise InputError(f"{path}: label volume holds non-integer values, e.g. {bad.tolist()}")
    return rounded.astype(np.int64)


def _to_codes(values: np.ndarray, table: np.ndarray, path: Path, *, allowed: str) -> np.ndarray:
    """Map label values to codes, refusing values the labels file does not name."""
    values = _integral(values, path)
    low, high = (int(values.min()), int(values.max())) if values.size else (0, 0)
    if low < 0 or high >= table.size:
        outside = values[(values < 0) | (values >= table.size)]
        raise InputError(f"{path}: label values {np.unique(outside)[:10].tolist()} are not in the labels file ({allowed})")
    codes = table[values]
    if codes.max(initial=0) == 65535:
        raise InputError(f"{path}: label values {np.unique(values[codes == 65535])[:10].tolist()} are not in the labels file ({allowed})")
    return codes.astype(np.uint8 if table[table != 65535].max() < 256 else np.uint16)


def _slice_z_mm(geometry: Geometry, axial_xyz: int, slice_indices: np.ndarray) -> np.ndarray:
    centre = (np.asarray(geometry.size_xyz, dtype=np.float64) - 1) / 2
    index = np.repeat(centre[None, :], slice_indices.size, axis=0)
    index[:, axial_xyz] = slice_indices
    physical = np.asarray(geometry.origin_mm) + (index * np.asarray(geometry.spacing_mm)) @ geometry.direction_matrix.T
    return physical[:, 2]


def read_annotated_slices(path: Path, label_set: LabelSet) -> AnnotatedSlices:
    """Read a ground-truth label volume and keep its annotated axial slices (see README: what counts as annotated)."""
    path = Path(path)
    check_complete(path, verify_gz=False)  # a truncated .mha gets a clear message; read_image checks .gz
    image = read_image(path)
    _check_label_image(image, path, "ground-truth label volume")
    geometry = Geometry.from_image(image)
    axial_xyz = axial_axis_xyz(geometry)
    volume = np.moveaxis(sitk.GetArrayViewFromImage(image), 2 - axial_xyz, 0)
    flat = volume.reshape(volume.shape[0], -1)
    ignore = label_set.ignore
    mins, maxs = flat.min(axis=1), flat.max(axis=1)
    maybe_ignore = np.flatnonzero((mins <= ignore) & (maxs >= ignore))
    all_ignore = (mins == ignore) & (maxs == ignore)
    has_ignore = bool(all_ignore.any()) or any(bool((flat[s] == ignore).any()) for s in maybe_ignore)
    if has_ignore:
        annotated = np.flatnonzero(~all_ignore)
        mode = "ignore-value"
    else:
        annotated = np.flatnonzero((mins != 0) | (maxs != 0))
        mode = "foreground-slices"
    if annotated.size == 0:
        what = f"every voxel is the ignore value {ignore}" if has_ignore else "no slice holds a foreground label"
        raise InputError(f"{path}: no annotated voxel ({what})")
    table = code_table(label_set, with_ignore=True)
    allowed = f"0, {', '.join(map(str, label_set.values))}, ignore {ignore}"
    codes = _to_codes(volume[annotated], table, path, allowed=allowed)
    return AnnotatedSlices(
        geometry=geometry,
        axial_axis_xyz=axial_xyz,
        slice_indices=annotated.astype(np.int64),
        z_mm=_slice_z_mm(geometry, axial_xyz, annotated),
        codes_syx=codes,
        pixel_spacing_mm=in_plane_spacing_mm(geometry, axial_xyz),
        mode=mode,
        unannotated_code=len(label_set.values) + 1,
    )


def _metaimage_header(path: Path) -> dict[str, str] | None:
    """Header fields of a MetaImage file and the byte offset of its local data (None: not parseable)."""
    with open(path, "rb") as stream:
        head = stream.read(1 << 16)
    fields: dict[str, str] = {}
    offset = 0
    for raw in head.split(b"\n"):
        offset += len(raw) + 1
        match = re.match(rb"\s*(\w+)\s*=\s*(.*?)\s*$", raw)
        if not match:
            return None
        key, value = match.group(1).decode("ascii", "replace"), match.group(2).decode("ascii", "replace")
        fields[key] = value
        if key == "ElementDataFile":
            fields["_data_offset"] = str(offset)
            return fields
    return None


def check_complete(path: Path, *, verify_gz: bool = True) -> bool:
    """Refuse a truncated file before any partial read; return whether it is a compressed MetaImage.

    .gz: decompressed end to end (preprocess.io.verify_gzip) unless `verify_gz` is False. .mha with
    local data: the data must be as long as the header says (CompressedDataSize, or the voxel count).
    """
    path = Path(path)
    if not path.exists():
        raise InputError(f"{path}: no such file")
    size = path.stat().st_size
    if size == 0:
        raise InputError(f"{path}: file is empty")
    name = path.name.lower()
    if name.endswith(".gz"):
        if verify_gz:
            verify_gzip(path)
        return False
    if not name.endswith(".mha"):
        return False
    fields = _metaimage_header(path)
    if fields is None or fields.get("ElementDataFile", "").upper() != "LOCAL" or "HeaderSize" in fields:
        return False
    compressed = fields.get("CompressedData", "False").strip().lower() == "true"
    available = size - int(fields["_data_offset"])
    expected = None
    if compressed and fields.get("CompressedDataSize", "").isdigit():
        expected = int(fields["CompressedDataSize"])
    elif not compressed and fields.get("ElementType") in _META_ELEMENT_BYTES:
        try:
            voxels = int(np.prod([int(v) for v in fields.get("DimSize", "").split()]))
            channels = int(fields.get("ElementNumberOfChannels", "1"))
        except ValueError:
            voxels, channels = 0, 1
        expected = voxels * channels * _META_ELEMENT_BYTES[fields["ElementType"]] or None
    if expected is not None and available < expected:
        raise InputError(f"{path}: truncated MetaImage ({available} of {expected} data bytes)")
    return compressed


def _extract(path: Path, *, size_xyz: tuple[int, int, int], axial_xyz: int, first: int, count: int) -> np.ndarray:
    """Read `count` slices from index `first` along the axial axis as a (count, rows, cols) array."""
    reader = sitk.ImageFileReader()
    reader.SetFileName(str(path))
    index = [0, 0, 0]
    size = list(size_xyz)
    index[axial_xyz], size[axial_xyz] = int(first), int(count)
    reader.SetExtractIndex(index)
    reader.SetExtractSize(size)
    try:
        image = reader.Execute()
    except RuntimeError as error:
        reason = str(error).strip().splitlines()[-1] if str(error).strip() else "unreadable"
        raise InputError(f"{path}: cannot read slices {first}..{first + count - 1} ({reason[:200]})") from None
    return np.moveaxis(sitk.GetArrayViewFromImage(image), 2 - axial_xyz, 0).copy()


def _runs(indices: np.ndarray) -> list[tuple[int, int]]:
    """Consecutive runs of sorted indices as (first, count)."""
    breaks = np.flatnonzero(np.diff(indices) != 1) + 1
    return [(int(run[0]), int(run.size)) for run in np.split(indices, breaks)]


@dataclass(frozen=True)
class SlicesOnTruthGrid:
    values_syx: np.ndarray  # raw voxel values on the truth's annotated slices (0 outside the file's field of view)
    grid: str  # "same" or "resampled"
    coverage: float  # fraction of annotated voxels inside the file's field of view
    read: str  # "slices" or "full"


def read_slices_on_truth_grid(path: Path, truth: AnnotatedSlices, *, case_id: str, what: str, strategy: str = "auto") -> SlicesOnTruthGrid:
    """Voxel values of a volume on the ground truth's annotated slices, read as the module docstring says.

    `strategy`: "auto", or "full" to read the whole file even on the same grid (the benchmark's baseline).
    """
    path = Path(path)
    reader = read_image_header(path)  # the same header checks as the algorithm's reader (a NaN sform hangs ITK's NIfTI reader)
    _check_label_image(reader, path, what)
    geometry = Geometry(
        size_xyz=tuple(int(s) for s in reader.GetSize()),
        spacing_mm=tuple(float(s) for s in reader.GetSpacing()),
        origin_mm=tuple(float(o) for o in reader.GetOrigin()),
        direction=tuple(float(d) for d in reader.GetDirection()),
    )
    wanted = truth.slice_indices
    on_grid = same_grid(geometry, truth.geometry)
    compressed_meta = check_complete(path, verify_gz=False)  # .mha: truncation caught with a clear message
    name = path.name.lower()
    streams = name.endswith(_STREAMING_SUFFIXES) or (name.endswith(".mha") and not compressed_meta)
    if on_grid and strategy != "full" and streams:
        if name.endswith(".gz"):
            verify_gzip(path)
        stacks = [_extract(path, size_xyz=geometry.size_xyz, axial_xyz=truth.axial_axis_xyz, first=f, count=c) for f, c in _runs(wanted)]
        return SlicesOnTruthGrid(values_syx=np.concatenate(stacks, axis=0), grid="same", coverage=1.0, read="slices")
    image = read_image(path)  # checks gzip integrity
    if on_grid:
        volume = np.moveaxis(sitk.GetArrayViewFromImage(image), 2 - truth.axial_axis_xyz, 0)
        return SlicesOnTruthGrid(values_syx=volume[wanted], grid="same", coverage=1.0, read="full")
    values, inside = _resample_onto_slices(image, truth)
    annotated = truth.codes_syx != truth.unannotated_code
    covered = int(np.count_nonzero(inside & annotated))
    if covered == 0:
        raise CaseError(
            case_id,
            f"{what} {path} does not overlap the annotated slices of the ground truth "
            f"({what}: {geometry.size_xyz} voxels of {np.round(geometry.spacing_mm, 3).tolist()} mm at "
            f"{np.round(geometry.origin_mm, 1).tolist()}; ground truth: {truth.geometry.size_xyz} voxels of "
            f"{np.round(truth.geometry.spacing_mm, 3).tolist()} mm at {np.round(truth.geometry.origin_mm, 1).tolist()})",
        )
    return SlicesOnTruthGrid(values_syx=values, grid="resampled", coverage=covered / int(np.count_nonzero(annotated)), read="full")


def read_prediction_slices(path: Path, truth: AnnotatedSlices, label_set: LabelSet, *, case_id: str, strategy: str = "auto") -> PredictionSlices:
    """The prediction's labels on the ground truth's annotated slices, as codes 0..K (values checked on what was read)."""
    found = read_slices_on_truth_grid(path, truth, case_id=case_id, what="prediction", strategy=strategy)
    allowed = f"0, {', '.join(map(str, label_set.values))}"
    codes = _to_codes(found.values_syx, code_table(label_set, with_ignore=False), Path(path), allowed=allowed)
    return PredictionSlices(codes_syx=codes, grid=found.grid, coverage=found.coverage, read=found.read)


def _resample_onto_slices(image: sitk.Image, truth: AnnotatedSlices) -> tuple[np.ndarray, np.ndarray]:
    """Nearest-neighbour resampling of `image` onto each annotated slice: (values, inside field of view)."""
    wider = {  # room for value + 1 at the smallest width (a uint8 volume must not become int64)
        sitk.sitkUInt8: sitk.sitkUInt16, sitk.sitkInt8: sitk.sitkInt16, sitk.sitkUInt16: sitk.sitkUInt32,
        sitk.sitkInt16: sitk.sitkInt32, sitk.sitkUInt32: sitk.sitkInt64, sitk.sitkInt32: sitk.sitkInt64,
        sitk.sitkUInt64: sitk.sitkInt64, sitk.sitkInt64: sitk.sitkInt64,
        sitk.sitkFloat32: sitk.sitkFloat64, sitk.sitkFloat64: sitk.sitkFloat64,
    }
    image = sitk.Cast(image, wider[image.GetPixelID()])
    shifted = image + 1  # 0 in the output now means "outside the prediction"
    reference = truth.geometry
    size = list(reference.size_xyz)
    size[truth.axial_axis_xyz] = 1
    direction = reference.direction_matrix
    values = []
    for s in truth.slice_indices:
        index = np.zeros(3)
        index[truth.axial_axis_xyz] = s
        origin = np.asarray(reference.origin_mm) + direction @ (index * np.asarray(reference.spacing_mm))
        resampled = sitk.Resample(
            shifted, size, sitk.Transform(), sitk.sitkNearestNeighbor, origin.tolist(), reference.spacing_mm,
            reference.direction, 0.0, shifted.GetPixelID(),
        )
        values.append(np.moveaxis(sitk.GetArrayViewFromImage(resampled), 2 - truth.axial_axis_xyz, 0)[0].copy())
    stack = np.stack(values)
    inside = stack != 0
    return np.where(inside, stack - 1, 0), inside
