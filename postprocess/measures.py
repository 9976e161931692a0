"""Muscle measures from a label map and its CT: per axial slice, per vertebral level, per muscle.

Everything is computed in the CT's nearest axis-aligned LPS frame (an exact permutation and flip of the
voxels, as the segmenter uses; exact for non-oblique scans): slice k runs inferior to superior, x towards
the patient's left, y towards posterior. Slice indices reported to the user are those of the input image's
own axial axis; z_mm is the physical S coordinate (LPS) of the slice centre.

Per muscle and slice: voxels, cross-sectional area (cm2, in the slice plane), mean and SD of HU (population
SD, ddof=0), fraction of the muscle's voxels below -30 HU (intramuscular fat; the upper limit of
Slice-O-Matic's / Comp2Comp's fat range), and, where the slice's vertebral body centre is known, the
muscle centroid relative to it (moment arm): anterior_mm (> 0: anterior of the body centre) and lateral_mm
(> 0: towards the muscle's own side, i.e. patient right for *_right muscles, patient left for *_left).
All sums go through np.bincount over (slice, label) keys of the muscle voxels only.
"""

from __future__ import annotations

import csv
import io
from dataclasses import dataclass

import numpy as np

from common.labels import LABELS, LEVELS, NUM_CLASSES
from postprocess.spine import body_centres_mm
from preprocess.geometry import Geometry, Reorientation
from preprocess.vertebrae import LEVEL_ORDER, majority_per_slice

FAT_THRESHOLD_HU = -30.0
_CHUNK_SLICES = 64


@dataclass(frozen=True)
class AxialFrame:
    """The nearest LPS axis frame of a CT and where its slices lie."""

    reorientation: Reorientation
    spacing_mm: tuple[float, float, float]  # (x, y, z) in the LPS frame
    input_slice: np.ndarray  # (n_slices,) index along the input's axial axis of each LPS slice
    z_mm: np.ndarray  # (n_slices,) physical S coordinate (LPS) of each slice centre

    @classmethod
    def of(cls, geometry: Geometry) -> "AxialFrame":
        reorientation = Reorientation.between(geometry, "LPS")
        source_axis = reorientation.transpose[0]  # numpy axis of the input that becomes z
        n = geometry.shape_zyx[source_axis]
        index = np.arange(n)
        if 0 in reorientation.flip_axes:
            index = index[::-1].copy()
        xyz_axis = 2 - source_axis
        voxel = np.tile((np.asarray(geometry.size_xyz, dtype=np.float64) - 1) / 2, (n, 1))
        voxel[:, xyz_axis] = index
        points = np.asarray(geometry.origin_mm) + (voxel * np.asarray(geometry.spacing_mm)) @ geometry.direction_matrix.T
        return cls(reorientation, reorientation.spacing_mm, index, points[:, 2])

    def view(self, volume_zyx: np.ndarray) -> np.ndarray:
        return self.reorientation.apply(volume_zyx)

    @property
    def pixel_area_cm2(self) -> float:
        return self.spacing_mm[0] * self.spacing_mm[1] / 100.0


@dataclass(frozen=True)
class SliceMeasures:
    """Per (LPS slice, label) sums and the per-slice vertebra; arrays are (n_slices, NUM_CLASSES) unless noted."""

    frame: AxialFrame
    voxels: np.ndarray
    hu_sum: np.ndarray
    hu_sq_sum: np.ndarray
    fat_voxels: np.ndarray
    x_sum_mm: np.ndarray
    y_sum_mm: np.ndarray
    slice_level: np.ndarray  # (n_slices,) index into LEVEL_ORDER + 1; 0: no vertebra on the slice (or no map)
    body_centre_mm: np.ndarray  # (n_slices, 2) (x, y) mm; NaN where unknown
    levels_known: bool

    def level_name(self, k: int) -> str:
        return LEVEL_ORDER[self.slice_level[k] - 1] if self.slice_level[k] else ""


def measure_slices(labels_zyx: np.ndarray, hu_zyx: np.ndarray, geometry: Geometry, *, vertebrae_zyx: np.ndarray | None = None) -> SliceMeasures:
    """Sums per axial slice and muscle; `vertebrae_zyx` (LEVEL_ORDER index + 1 per voxel, on the CT grid) is optional."""
    if labels_zyx.shape != hu_zyx.shape or labels_zyx.shape != geometry.shape_zyx:
        raise ValueError(f"label map {labels_zyx.shape}, CT {hu_zyx.shape} and geometry {geometry.shape_zyx} differ in shape")
    if labels_zyx.size and int(labels_zyx.max()) >= NUM_CLASSES:
        raise ValueError(f"label map holds value {int(labels_zyx.max())}, beyond the {NUM_CLASSES - 1} muscle labels")
    frame = AxialFrame.of(geometry)
    labels = frame.view(labels_zyx)
    hu = frame.view(hu_zyx)
    n_slices, n = labels.shape[0], NUM_CLASSES
    sx, sy, _ = frame.spacing_mm
    sums = {key: np.zeros((n_slices, n)) for key in SUM_NAMES}
    for start in range(0, n_slices, _CHUNK_SLICES):
        stop = min(start + _CHUNK_SLICES, n_slices)
        chunk, hu_chunk = labels[start:stop], hu[start:stop]
        dense = np.count_nonzero(chunk) > _DENSE_FRACTION * chunk.size
        chunk_sums = (slice_sums_dense if dense else slice_sums_sparse)(chunk, hu_chunk, n_labels=n, pixel_mm=(sx, sy))
        for name, values in chunk_sums.items():
            sums[name][start:stop] = values
    if vertebrae_zyx is None:
        slice_level = np.zeros(n_slices, dtype=np.int64)
        centres = np.full((n_slices, 2), np.nan)
    else:
        if vertebrae_zyx.shape != labels_zyx.shape:
            raise ValueError(f"vertebra map {vertebrae_zyx.shape} is not on the CT grid {labels_zyx.shape}")
        vertebrae = frame.view(vertebrae_zyx)
        slice_level = majority_per_slice(vertebrae, len(LEVEL_ORDER))
        centres = body_centres_mm(vertebrae, slice_level, pixel_spacing_mm=(sx, sy))
    return SliceMeasures(frame=frame, slice_level=slice_level, body_centre_mm=centres, levels_known=vertebrae_zyx is not None, **sums)


SUM_NAMES = ("voxels", "hu_sum", "hu_sq_sum", "fat_voxels", "x_sum_mm", "y_sum_mm")
#: above this fraction of muscle voxels in a chunk, sums over all voxels beat gathering the muscle voxels first
_DENSE_FRACTION = 0.25


def slice_sums_sparse(labels: np.ndarray, hu: np.ndarray, *, n_labels: int, pixel_mm: tuple[float, float]) -> dict[str, np.ndarray]:
    """(slices, n_labels) sums over the muscle voxels only, gathered with np.nonzero: the fast way for a few percent of muscle."""
    z, y, x = np.nonzero(labels)
    keys = z * n_labels + labels[z, y, x].astype(np.int64)
    h = hu[z, y, x].astype(np.float64)
    size = labels.shape[0] * n_labels
    weights = {"voxels": None, "hu_sum": h, "hu_sq_sum": h * h, "fat_voxels": (h < FAT_THRESHOLD_HU).astype(np.float64),
               "x_sum_mm": x * pixel_mm[0], "y_sum_mm": y * pixel_mm[1]}
    return {name: np.bincount(keys, weights=w, minlength=size).reshape(-1, n_labels) for name, w in weights.items()}


def slice_sums_dense(labels: np.ndarray, hu: np.ndarray, *, n_labels: int, pixel_mm: tuple[float, float]) -> dict[str, np.ndarray]:
    """The same sums over every voxel, background dropped at the end: no gathers, and the coordinate sums as counts
    per (slice, label, column) and (slice, label, row) times the column and row positions. 3-4x faster where most
    voxels are muscle (a random network's output, a tightly cropped scan), and less memory than the gathers."""
    n_slices, height, width = labels.shape
    size = n_slices * n_labels
    key = labels.astype(np.int32) + (np.arange(n_slices, dtype=np.int32) * n_labels)[:, None, None]
    flat = key.ravel()
    h = hu.astype(np.float64).ravel()
    out = {"voxels": np.bincount(flat, minlength=size), "hu_sum": np.bincount(flat, weights=h, minlength=size),
           "fat_voxels": np.bincount(flat[h < FAT_THRESHOLD_HU], minlength=size)}
    np.multiply(h, h, out=h)
    out["hu_sq_sum"] = np.bincount(flat, weights=h, minlength=size)
    del h
    columns = np.bincount((key * width + np.arange(width, dtype=np.int32)).ravel(), minlength=size * width).reshape(size, width)
    out["x_sum_mm"] = columns @ (np.arange(width) * pixel_mm[0])
    del columns
    rows = np.bincount((key * height + np.arange(height, dtype=np.int32)[:, None]).ravel(), minlength=size * height).reshape(size, height)
    out["y_sum_mm"] = rows @ (np.arange(height) * pixel_mm[1])
    out = {name: values.astype(np.float64).reshape(n_slices, n_labels) for name, values in out.items()}
    for values in out.values():
        values[:, 0] = 0  # background: not a muscle (the sparse sums never see it)
    return out


def _side_sign() -> np.ndarray:
    """+1 for left muscles (lateral = +x, towards L), -1 for right ones, 0 for background; by label value."""
    sign = np.zeros(NUM_CLASSES)
    for name, value in LABELS.items():
        sign[value] = 1.0 if name.endswith("_left") else -1.0
    return sign


def derive(voxels, hu_sum, hu_sq_sum, fat_voxels, x_sum_mm, y_sum_mm, centre_mm, *, pixel_area_cm2: float) -> dict[str, np.ndarray]:
    """Area, HU mean/SD, fat fraction and moment arms from sums (any leading shape, labels last); NaN where undefined."""
    with np.errstate(invalid="ignore", divide="ignore"):
        present = voxels > 0
        mean = np.where(present, hu_sum / voxels, np.nan)
        variance = np.where(present, hu_sq_sum / voxels - mean * mean, np.nan)
        cx = np.where(present, x_sum_mm / voxels, np.nan)
        cy = np.where(present, y_sum_mm / voxels, np.nan)
        return {
            "area_cm2": voxels * pixel_area_cm2,
            "mean_hu": mean,
            "sd_hu": np.sqrt(np.maximum(variance, 0.0)),
            "fat_fraction": np.where(present, fat_voxels / voxels, np.nan),
            "anterior_mm": centre_mm[..., 1:2] - cy,
            "lateral_mm": (cx - centre_mm[..., 0:1]) * _side_sign(),
        }


def per_slice(measures: SliceMeasures) -> dict[str, np.ndarray]:
    m = measures
    return derive(m.voxels, m.hu_sum, m.hu_sq_sum, m.fat_voxels, m.x_sum_mm, m.y_sum_mm, m.body_centre_mm, pixel_area_cm2=m.frame.pixel_area_cm2)


def _number(value: float, digits: int):
    return None if not np.isfinite(value) else round(float(value), digits)


_DIGITS = {"area_cm2": 3, "mean_hu": 2, "sd_hu": 2, "fat_fraction": 4, "anterior_mm": 1, "lateral_mm": 1}


def _muscle_entry(values: dict[str, np.ndarray], value: int) -> dict:
    return {key: _number(values[key][value], _DIGITS[key]) for key in _DIGITS}


def level_slices(measures: SliceMeasures) -> dict[str, tuple[np.ndarray, int]]:
    """Per canonical level T4..L4 present: (its LPS slices, its mid-slice), cranial level first.

    A level's slices are those whose majority vertebra it is; the mid-slice is the one nearest to their mean z.
    """
    out = {}
    for level in LEVELS:
        slices = np.flatnonzero(measures.slice_level == LEVEL_ORDER.index(level) + 1)
        if len(slices):
            z = measures.frame.z_mm[slices]
            out[level] = (slices, int(slices[np.argmin(np.abs(z - z.mean()))]))
    return out


def summarise_levels(measures: SliceMeasures) -> dict:
    """Per canonical level T4..L4 present: its slices, mid-slice, and each present muscle at the mid-slice and over the level.

    See `level_slices` for a level's slices and mid-slice. "level_mean" pools the level's slices: area is the
    mean per-slice area (0 where the muscle is absent), HU and fat fraction pool all its voxels, moment arms
    are voxel-weighted over the slices that have a body centre.
    """
    m = measures
    values = per_slice(m)
    out = {}
    for level, (slices, mid) in level_slices(m).items():
        pooled = {key: getattr(m, key)[slices].sum(axis=0) for key in ("voxels", "hu_sum", "hu_sq_sum", "fat_voxels")}
        with_centre = slices[np.isfinite(m.body_centre_mm[slices, 0])]
        arm_weights = m.voxels[with_centre]
        arm_voxels = arm_weights.sum(axis=0)
        with np.errstate(invalid="ignore", divide="ignore"):
            anterior = np.where(arm_voxels > 0, np.nansum(values["anterior_mm"][with_centre] * arm_weights, axis=0) / arm_voxels, np.nan)
            lateral = np.where(arm_voxels > 0, np.nansum(values["lateral_mm"][with_centre] * arm_weights, axis=0) / arm_voxels, np.nan)
        mean_values = derive(pooled["voxels"], pooled["hu_sum"], pooled["hu_sq_sum"], pooled["fat_voxels"], np.zeros(NUM_CLASSES), np.zeros(NUM_CLASSES),
                             np.full(2, np.nan), pixel_area_cm2=m.frame.pixel_area_cm2)
        mean_values["area_cm2"] = mean_values["area_cm2"] / len(slices)
        mean_values["anterior_mm"], mean_values["lateral_mm"] = anterior, lateral
        mid_values = {key: array[mid] for key, array in values.items()}
        centre = m.body_centre_mm[mid]
        out[level] = {
            "slices": [int(m.frame.input_slice[slices].min()), int(m.frame.input_slice[slices].max())],
            "n_slices": int(len(slices)),
            "mid_slice": int(m.frame.input_slice[mid]),
            "mid_z_mm": round(float(m.frame.z_mm[mid]), 2),
            "body_centre_found": bool(np.isfinite(centre[0])),
            "muscles": {
                name: {"mid_slice": _muscle_entry(mid_values, value), "level_mean": _muscle_entry(mean_values, value)}
                for name, value in LABELS.items()
                if pooled["voxels"][value] > 0
            },
        }
    return out


def summarise_muscles(measures: SliceMeasures, geometry: Geometry) -> dict[str, dict]:
    """Per canonical muscle: voxels, volume (cm3), mean/SD HU, fat fraction, and its cranio-caudal extent."""
    m = measures
    totals = {key: getattr(m, key).sum(axis=0) for key in ("voxels", "hu_sum", "hu_sq_sum", "fat_voxels")}
    values = derive(totals["voxels"], totals["hu_sum"], totals["hu_sq_sum"], totals["fat_voxels"], np.zeros(NUM_CLASSES), np.zeros(NUM_CLASSES),
                    np.full(2, np.nan), pixel_area_cm2=m.frame.pixel_area_cm2)
    voxel_cm3 = geometry.voxel_volume_mm3 / 1000.0
    out = {}
    for name, value in LABELS.items():
        on = np.flatnonzero(m.voxels[:, value] > 0)
        entry = {
            "label": value,
            "voxels": int(totals["voxels"][value]),
            "volume_cm3": round(float(totals["voxels"][value] * voxel_cm3), 3),
            "mean_hu": _number(values["mean_hu"][value], 2),
            "sd_hu": _number(values["sd_hu"][value], 2),
            "fat_fraction": _number(values["fat_fraction"][value], 4),
            "extent": None,
        }
        if len(on):
            first, last = on[0], on[-1]  # LPS slices: inferior first
            entry["extent"] = {
                "inferior_slice": int(m.frame.input_slice[first]),
                "superior_slice": int(m.frame.input_slice[last]),
                "inferior_z_mm": round(float(m.frame.z_mm[first]), 2),
                "superior_z_mm": round(float(m.frame.z_mm[last]), 2),
                "length_mm": round(float(abs(m.frame.z_mm[last] - m.frame.z_mm[first]) + m.frame.spacing_mm[2]), 2),
                "levels": [lv for lv in LEVEL_ORDER if np.any(m.slice_level[on] == LEVEL_ORDER.index(lv) + 1)] if m.levels_known else None,
            }
        out[name] = entry
    return out


CSV_COLUMNS = ("slice_index", "z_mm", "level", "muscle", "label", "voxels", "area_cm2", "mean_hu", "sd_hu", "fat_fraction_below_minus30hu",
               "centroid_anterior_mm", "centroid_lateral_mm")


def slice_table_csv(measures: SliceMeasures) -> str:
    """The per-slice table as CSV text: one row per (slice, muscle present on it), superior slice first."""
    m = measures
    values = per_slice(m)
    k, label = np.nonzero(m.voxels > 0)
    order = np.lexsort((label, -m.frame.z_mm[k]))
    k, label = k[order], label[order]
    names = {value: name for name, value in LABELS.items()}
    stream = io.StringIO()
    writer = csv.writer(stream, lineterminator="\n")
    writer.writerow(CSV_COLUMNS)

    def text(value: float, digits: int) -> str:
        return "" if not np.isfinite(value) else f"{value:.{digits}f}"

    for slice_k, value in zip(k.tolist(), label.tolist()):
        writer.writerow((
            int(m.frame.input_slice[slice_k]), f"{m.frame.z_mm[slice_k]:.2f}", m.level_name(slice_k), names[value], value, int(m.voxels[slice_k, value]),
            text(values["area_cm2"][slice_k, value], 3), text(values["mean_hu"][slice_k, value], 2), text(values["sd_hu"][slice_k, value], 2),
            text(values["fat_fraction"][slice_k, value], 4), text(values["anterior_mm"][slice_k, value], 1), text(values["lateral_mm"][slice_k, value], 1),
        ))
    return stream.getvalue()
