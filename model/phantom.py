"""Synthetic trunk CT phantoms from T4 to L4 with all 22 canonical muscles placed by vertebral level.

Seeded, numpy only, vectorised over slices in chunks. A phantom is built in the LPS frame (x towards
the patient's left, y posterior, z superior) with identity direction; any in-plane size and spacing.
Besides the CT (int16 HU) it gives the dense labels, the vertebral level of every slice, and the
sparse labels a reader would draw: the mid-slice of each level T4-L4 annotated, all else IGNORE.

Anatomy is schematic but keeps what a 2D network must learn from: muscles of muscle HU (about 50)
wrapped in a thin fat fascia, body-wall muscles as ring segments under subcutaneous fat, deep back
muscles, psoas and quadratus lumborum as ellipses around a vertebra, and organs that tell the levels
apart (lungs T4-T12, heart T5-T9, liver T10-L1, kidneys T12-L3).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from common.labels import IGNORE, LABELS, LEVELS
from preprocess.geometry import Geometry

N_LEVELS = len(LEVELS)
_LEVEL = {name: i for i, name in enumerate(LEVELS)}

# Levels (inclusive, by name) where each muscle exists, as the issue specifies.
MUSCLE_LEVELS = {
    "pectoralis_major": ("T4", "T9"),
    "rectus_abdominis": ("T10", "L4"),
    "serratus_anterior": ("T4", "T11"),
    "latissimus_dorsi": ("T4", "L3"),
    "trapezius": ("T4", "T11"),
    "external_oblique": ("T10", "L4"),
    "internal_oblique": ("L2", "L4"),
    "erector_spinae": ("T4", "L4"),
    "transversospinalis": ("T4", "L4"),
    "psoas_major": ("L1", "L4"),
    "quadratus_lumborum": ("L1", "L4"),
}

HU = {"air": -1000, "lung": -850, "fat": -100, "muscle": 50, "bone": 300, "cortex": 800, "disc": 85,
      "heart": 40, "liver": 60, "kidney": 30, "bowel": 20, "cord": 35}


@dataclass(frozen=True)
class Phantom:
    ct_zyx: np.ndarray  # int16 HU
    labels_zyx: np.ndarray  # uint8 dense labels
    sparse_labels_zyx: np.ndarray  # uint8: labels on each level's mid-slice, IGNORE elsewhere
    level_of_slice: np.ndarray  # int8 per slice: index into LEVELS, -1 outside T4-L4
    mid_slices: np.ndarray  # slice index of each level's mid-point (len 13, cranial to caudal)
    geometry: Geometry


@dataclass(frozen=True)
class _Anatomy:
    """Random per-case parameters; everything in mm."""

    level_top_mm: np.ndarray  # z of the top of each level, cranial to caudal (len 13 + 1 bottoms)
    half_width_mm: float
    half_depth_mm: float
    fat_mm: float
    centre_mm: tuple[float, float]
    wobble: np.ndarray  # (k, 3): amplitude, frequency, phase of smooth body-size variation
    muscle_jitter: np.ndarray  # (22, 4) per-muscle random shape factors in [-1, 1]
    muscle_hu: np.ndarray  # (23,) HU offset per label
    noise_hu: float


def _draw_anatomy(rng: np.random.Generator) -> _Anatomy:
    heights = np.concatenate([rng.uniform(21, 27, 9), rng.uniform(29, 36, 4)])
    tops = np.concatenate([[0.0], -np.cumsum(heights)])  # z decreases caudally; top of T4 at 0
    return _Anatomy(
        level_top_mm=tops,
        half_width_mm=rng.uniform(145, 175),
        half_depth_mm=rng.uniform(100, 120),
        fat_mm=rng.uniform(8, 22),
        centre_mm=(rng.uniform(-8, 8), rng.uniform(-8, 8)),
        wobble=np.column_stack([rng.uniform(0.0, 0.05, 3), rng.uniform(0.003, 0.02, 3), rng.uniform(0, 2 * np.pi, 3)]),
        muscle_jitter=rng.uniform(-1, 1, (len(LABELS), 4)),
        muscle_hu=np.concatenate([[0], rng.uniform(-10, 10, len(LABELS))]),
        noise_hu=rng.uniform(8, 20),
    )


def _level_coordinate(anatomy: _Anatomy, z_mm: np.ndarray) -> np.ndarray:
    """Continuous level coordinate: 0.0 at the top of T4, 13.0 at the bottom of L4, fraction within a level."""
    tops = anatomy.level_top_mm
    index = np.clip(np.searchsorted(-tops, -z_mm, side="right") - 1, 0, N_LEVELS - 1)
    fraction = (tops[index] - z_mm) / (tops[index] - tops[index + 1])
    return index + fraction


def _present(name: str, level: np.ndarray) -> np.ndarray:
    first, last = MUSCLE_LEVELS[name]
    return (level >= _LEVEL[first]) & (level < _LEVEL[last] + 1)


def _render(anatomy: _Anatomy, z_mm: np.ndarray, x_mm: np.ndarray, y_mm: np.ndarray, rng: np.random.Generator):
    """Render CT and labels for slices at z_mm (chunk) on the in-plane grid (x_mm, y_mm)."""
    level = _level_coordinate(anatomy, z_mm)[:, None, None]  # (n, 1, 1)
    z = z_mm[:, None, None]
    wob = (anatomy.wobble[:, :1, None, None] * np.sin(anatomy.wobble[:, 1:2, None, None] * z + anatomy.wobble[:, 2:3, None, None])).sum(0)
    lumbar = np.clip(level - 8.0, 0, 5) / 5.0  # 0 in thorax, rises to 1 at L4
    a = anatomy.half_width_mm * (1 + wob) * (1 - 0.06 * lumbar)
    b = anatomy.half_depth_mm * (1 + wob) * (0.95 + 0.05 * lumbar)
    cx, cy = anatomy.centre_mm
    x = x_mm[None, None, :] - cx
    y = y_mm[None, :, None] - cy
    r = np.sqrt((x / a) ** 2 + (y / b) ** 2)
    scale = 0.5 * (a + b)
    depth = (1 - r) * scale  # approx. mm below the skin
    wall = depth - anatomy.fat_mm  # mm below the subcutaneous fat
    alpha = np.degrees(np.arctan2(np.abs(x) / a, -y / b))  # 0 anterior, 90 lateral, 180 posterior
    right = x < 0  # patient's right in LPS
    shape = np.broadcast_shapes(r.shape, x.shape, y.shape)

    ct = np.full(shape, HU["air"], dtype=np.float32)
    labels = np.zeros(shape, dtype=np.uint8)
    body = r <= 1
    ct[body] = HU["fat"]
    cavity = wall > 20
    ct = np.where(cavity, HU["bowel"] - 110 * (level < 9), ct)  # mediastinal fat / abdominal content

    # spine: vertebral body, canal, spinous process
    radius = 15 + 6 * lumbar
    vx, vy = 0.0, 0.32 * b
    dv = np.sqrt((x - vx) ** 2 + (y - vy) ** 2)
    frac = level - np.floor(level)
    disc = (frac < 0.12) | (frac > 0.94)
    ct = np.where(dv < radius, np.where(disc, HU["disc"], HU["bone"]), ct)
    ct = np.where((dv >= radius - 2) & (dv < radius) & ~disc, HU["cortex"], ct)
    canal_y = vy + radius + 9
    dc = np.sqrt((x - vx) ** 2 + (y - canal_y) ** 2)
    ct = np.where((dc < 9) & (dc >= 7), HU["cortex"], np.where(dc < 7, HU["cord"], ct))
    spinous = (np.abs(x - vx) < 3) & (y > canal_y + 9) & (y < canal_y + 38)
    ct = np.where(spinous, HU["cortex"], ct)

    # organs
    in_lung = (level < 9) & (((np.abs(x) - 0.45 * a) / (0.3 * a)) ** 2 + ((y + 0.03 * b) / ((0.55 - 0.2 * np.clip(level - 7, 0, 2) / 2) * b)) ** 2 < 1)
    ct = np.where(in_lung & cavity, HU["lung"], ct)
    heart = (level >= 1) & (level < 6) & (((x - 0.12 * a) / (0.27 * a)) ** 2 + ((y + 0.3 * b) / (0.3 * b)) ** 2 < 1)
    ct = np.where(heart & cavity, HU["heart"], ct)
    liver = (level >= 6) & (level < 10) & (((x + 0.35 * a) / (0.42 * a)) ** 2 + ((y + 0.05 * b) / (0.5 * b)) ** 2 < 1)
    ct = np.where(liver & cavity, HU["liver"], ct)
    kidney = (level >= 8) & (level < 12) & (((np.abs(x) - 75) / 22) ** 2 + ((y - vy + 5) / 28) ** 2 < 1)
    ct = np.where(kidney & cavity, HU["kidney"], ct)
    aorta = np.sqrt((x - 18) ** 2 + (y - (vy - radius - 14)) ** 2) < 11
    ct = np.where(aorta, HU["heart"], ct)
    ribs = (level < 10) & (wall > 12) & (wall < 19) & (np.cos(np.radians(alpha) * 9 + z * 0.15) > 0.2) & (alpha < 160)
    ct = np.where(ribs, HU["cortex"], ct)

    jit = anatomy.muscle_jitter

    def paint(name: str, region: np.ndarray) -> None:
        nonlocal labels
        for side, mask_side in (("right", right), ("left", ~right)):
            value = LABELS[f"{name}_{side}"]
            labels = np.where(region & mask_side & body & _present(name, level), np.uint8(value), labels)

    def wall_segment(name: str, alpha_range, depth_range) -> np.ndarray:
        j = jit[LABELS[f"{name}_right"] - 1]
        lo, hi = alpha_range[0] + 3 * j[0], alpha_range[1] + 3 * j[1]
        thick = depth_range[1] * (1 + 0.15 * j[2])
        return (alpha >= lo) & (alpha <= hi) & (wall >= depth_range[0]) & (wall <= thick)

    def ellipse(name: str, centre, semi) -> np.ndarray:
        j = jit[LABELS[f"{name}_right"] - 1]
        ex = np.abs(x) - (centre[0] + 2 * j[0])
        ey = y - (centre[1] + 2 * j[1])
        return (ex / (semi[0] * (1 + 0.1 * j[2]))) ** 2 + (ey / (semi[1] * (1 + 0.1 * j[3]))) ** 2 < 1

    back = vy + radius + 22
    paint("transversospinalis", ellipse("transversospinalis", (13, back), (8, 12)))
    paint("erector_spinae", ellipse("erector_spinae", (38, back), (17 + 6 * lumbar, 15)))
    psoas_size = 8 + 14 * np.clip(level - 9, 0, 4) / 4
    paint("psoas_major", ellipse("psoas_major", (radius + 8 + psoas_size * 0.6, vy - 4), (psoas_size, psoas_size * 0.9)))
    paint("quadratus_lumborum", ellipse("quadratus_lumborum", (radius + 48, vy + 14), (15, 9)))
    thorax_upper = level < 6
    serratus = _present("serratus_anterior", level)
    paint("pectoralis_major", wall_segment("pectoralis_major", (14, 68), (0, 12 + 6 * (level < 4))))
    paint("serratus_anterior", wall_segment("serratus_anterior", (74 - 4 * thorax_upper, 112), (0, 10)))
    paint("latissimus_dorsi", wall_segment("latissimus_dorsi", (118, 148), (0, 11)))
    paint("trapezius", wall_segment("trapezius", (153, 178), (0, 8)))
    paint("rectus_abdominis", wall_segment("rectus_abdominis", (3, 32), (0, 11)))
    paint("external_oblique", wall_segment("external_oblique", (40, np.where(serratus, 70, 112)), (0, 9)))
    paint("internal_oblique", wall_segment("internal_oblique", (44, 110), (12, 21)))

    muscle = labels > 0
    hu = anatomy.muscle_hu[labels]
    ct = np.where(muscle, HU["muscle"] + hu, ct)
    # fascia: a fat outline wherever a muscle voxel touches another label
    edge = np.zeros(shape, dtype=bool)
    for axis in (1, 2):
        differs = np.diff(labels, axis=axis) != 0
        lead = [(0, 0)] * 3
        lead[axis] = (1, 0)
        trail = [(0, 0)] * 3
        trail[axis] = (0, 1)
        edge |= np.pad(differs, trail) | np.pad(differs, lead)
    ct = np.where(edge & muscle, HU["fat"] + 30, ct)
    ct += rng.normal(0, anatomy.noise_hu, shape).astype(np.float32)
    ct = np.where(body, ct, HU["air"] + rng.normal(0, 5, shape).astype(np.float32))
    return np.clip(np.rint(ct), -1024, 3071).astype(np.int16), labels


def make_phantom(
    seed: int,
    *,
    size_xy: tuple[int, int] = (256, 256),
    spacing_mm: tuple[float, float, float] = (1.5, 1.5, 3.0),
    n_slices: int | None = None,
    chunk: int = 16,
) -> Phantom:
    """Make a trunk phantom from the top of T4 to the bottom of L4.

    With `n_slices`, the slice spacing is chosen so that T4-L4 fills exactly that many slices
    (spacing_mm[2] is then ignored).
    """
    rng = np.random.default_rng(seed)
    anatomy = _draw_anatomy(rng)
    bottom = anatomy.level_top_mm[-1]
    if n_slices is not None:
        spacing_mm = (spacing_mm[0], spacing_mm[1], float(-bottom / n_slices))
    else:
        n_slices = max(1, int(np.floor(-bottom / spacing_mm[2])))
    z_mm = bottom + (np.arange(n_slices) + 0.5) * spacing_mm[2]  # caudal to cranial (LPS: +z superior)
    x_mm = (np.arange(size_xy[0]) - (size_xy[0] - 1) / 2) * spacing_mm[0]
    y_mm = (np.arange(size_xy[1]) - (size_xy[1] - 1) / 2) * spacing_mm[1]
    ct = np.empty((n_slices, size_xy[1], size_xy[0]), dtype=np.int16)
    labels = np.empty_like(ct, dtype=np.uint8)
    for start in range(0, n_slices, chunk):
        stop = min(n_slices, start + chunk)
        ct[start:stop], labels[start:stop] = _render(anatomy, z_mm[start:stop], x_mm, y_mm, rng)
    level = _level_coordinate(anatomy, z_mm)
    level_of_slice = np.floor(level).astype(np.int8)
    mids = 0.5 * (anatomy.level_top_mm[:-1] + anatomy.level_top_mm[1:])
    mid_slices = np.clip(np.rint((mids - z_mm[0]) / spacing_mm[2]).astype(int), 0, n_slices - 1)
    sparse = np.full_like(labels, IGNORE)
    sparse[mid_slices] = labels[mid_slices]
    geometry = Geometry(
        size_xyz=(size_xy[0], size_xy[1], n_slices),
        spacing_mm=tuple(float(s) for s in spacing_mm),
        origin_mm=(float(x_mm[0]), float(y_mm[0]), float(z_mm[0])),
        direction=(1.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 1.0),
    )
    return Phantom(ct, labels, sparse, level_of_slice, mid_slices, geometry)


def make_annotated_slices(
    seed: int, *, size_xy: tuple[int, int] = (256, 256), pixel_spacing_mm: float = 1.5, jitter_mm: float = 0.0
) -> tuple[np.ndarray, np.ndarray]:
    """The 13 slices a reader annotates (mid-level T4-L4) of one random phantom: (ct, labels), each (13, y, x).

    `jitter_mm` moves each slice randomly along z (up to +-jitter), for training variety.
    """
    rng = np.random.default_rng(seed)
    anatomy = _draw_anatomy(rng)
    tops = anatomy.level_top_mm
    heights = tops[:-1] - tops[1:]
    z_mm = 0.5 * (tops[:-1] + tops[1:]) + rng.uniform(-1, 1, N_LEVELS) * np.minimum(jitter_mm, 0.45 * heights)
    x_mm = (np.arange(size_xy[0]) - (size_xy[0] - 1) / 2) * pixel_spacing_mm
    y_mm = (np.arange(size_xy[1]) - (size_xy[1] - 1) / 2) * pixel_spacing_mm
    return _render(anatomy, z_mm, x_mm, y_mm, rng)


def write_phantom(phantom: Phantom, folder, *, name: str) -> dict:
    """Write <name>.mha (CT), <name>_labels.mha (dense), <name>_sparse.mha (reader's sparse labels) and <name>_levels.json."""
    import json
    from pathlib import Path

    import SimpleITK as sitk

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    paths = {
        "ct": folder / f"{name}.mha",
        "labels": folder / f"{name}_labels.mha",
        "sparse_labels": folder / f"{name}_sparse.mha",
        "levels": folder / f"{name}_levels.json",
    }
    for key in ("ct", "labels", "sparse_labels"):
        array = {"ct": phantom.ct_zyx, "labels": phantom.labels_zyx, "sparse_labels": phantom.sparse_labels_zyx}[key]
        sitk.WriteImage(phantom.geometry.apply_to(sitk.GetImageFromArray(array)), str(paths[key]), useCompression=True)
    levels = {
        "levels": list(LEVELS),
        "mid_slice_of_level": {level: int(s) for level, s in zip(LEVELS, phantom.mid_slices)},
        "level_of_slice": [LEVELS[i] if i >= 0 else None for i in phantom.level_of_slice.tolist()],
    }
    paths["levels"].write_text(json.dumps(levels, indent=1) + "\n")
    return paths


def main() -> int:
    import argparse

    parser = argparse.ArgumentParser(description="Write a synthetic trunk phantom (CT, dense and sparse labels, levels).")
    parser.add_argument("--seed", type=int, required=True)
    parser.add_argument("--size", type=int, nargs=2, default=(256, 256), metavar=("X", "Y"))
    parser.add_argument("--spacing", type=float, nargs=3, default=(1.5, 1.5, 3.0), metavar=("X", "Y", "Z"))
    parser.add_argument("--out", required=True, help="output folder")
    parser.add_argument("--name", default=None, help="file name stem (default phantom-<seed>)")
    args = parser.parse_args()
    phantom = make_phantom(args.seed, size_xy=tuple(args.size), spacing_mm=tuple(args.spacing))
    for path in write_phantom(phantom, args.out, name=args.name or f"phantom-{args.seed}").values():
        print(path)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
