"""Turn CT volumes with sparse annotations into an nnU-Net v2 raw dataset of annotated axial slices.

    python -m training.prepare_nnunet --images CT_DIR --labels LABEL_DIR --out nnUNet_raw/Dataset501_TrunkMuscle

The published method trains nnU-Net's 2D U-Net on sparse annotations: one axial slice at the mid-point
of each vertebral level T4-L4 per patient. nnU-Net trains a 2D configuration on whatever 3D files it
is given, sampling every slice, so unannotated slices must not reach it. This tool writes each
annotated slice as its own 2D case (a one-slice image), which is exactly what was annotated:

- Input: CT volumes (.mha/.nii(.gz)/.nrrd, or DICOM series folders) in --images, and label volumes
  on the same grid in --labels, named like the CT (optionally with --label-suffix, e.g. "_sparse").
  Label values are the canonical ones (common/labels.json, 1..22), 0 for background, and the ignore
  value (default 255) for unannotated voxels. A slice is taken when it holds at least one muscle
  label; every other slice (all ignore, or all background) is left out.
- Frame: every volume is reoriented to one axis frame (--frame, default LPS) before slicing, so the
  network learns one voxel order whatever scanner or converter stored each CT. The frame is written
  into dataset.json ("trunkseg_frame"), where `python -m model.import_nnunet` reads it back: our
  container reorients every input to it.
- Spacing: the in-plane pixel spacing of each CT is kept. The out-of-plane spacing of the one-slice
  images is written as 999 mm, nnU-Net's own convention for 2D data: nnU-Net's planner puts the axis
  with the largest spacing first (plans "transpose_forward") and the 2D U-Net slices along it, so a
  thin-slice CT (slice thickness below the pixel spacing) written with its true thickness would make
  nnU-Net cut the one-slice images sideways.
- Labels: dataset.json lists the canonical names. By default (--classes present) only the canonical
  labels that occur in the annotations become classes, renumbered consecutively as nnU-Net requires;
  --classes all keeps all 22 with their canonical values. Where an annotated slice also holds ignore
  voxels (a slice only partly annotated), those become nnU-Net's "ignore" label (the highest value),
  which nnU-Net's loss skips.
- Splits: splits_final.json with patient-grouped folds (all slices of one patient in one fold), to be
  copied into nnUNet_preprocessed/<dataset>/ before training (nnU-Net's default random split would put
  slices of one patient in both training and validation).

docs/nnunet.md gives the nnU-Net commands that follow and the import of the trained model.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import SimpleITK as sitk

from common.labels import IGNORE, LABELS, NAMES
from common.errors import InputError, TrunkSegError
from preprocess.geometry import Geometry, parse_frame
from preprocess.io import IMAGE_SUFFIXES, case_id, read_ct, read_image

#: out-of-plane spacing written for the one-slice images (nnU-Net's NaturalImage2DIO uses the same)
SLICE_SPACING_MM = 999.0
FRAME_KEY = "trunkseg_frame"
DATASET_NAME = re.compile(r"^Dataset(\d{3})_([A-Za-z0-9_\-]+)$")


@dataclass(frozen=True)
class Pair:
    case: str
    image: Path
    labels: Path


def find_pairs(images: Path, labels: Path, *, label_suffix: str = "") -> list[Pair]:
    """CT files (or DICOM folders) in `images` paired by case name with label files in `labels`."""
    if not images.is_dir():
        raise InputError(f"{images}: not a folder")
    if not labels.is_dir():
        raise InputError(f"{labels}: not a folder")
    label_files = {}
    for path in sorted(labels.iterdir()):
        if path.is_file() and path.name.lower().endswith(IMAGE_SUFFIXES):
            name = case_id(path)
            if label_suffix and name.endswith(label_suffix):
                name = name[: -len(label_suffix)]
            elif label_suffix:
                continue
            label_files[name] = path
    pairs = []
    for path in sorted(images.iterdir()):
        if path.name.startswith("."):
            continue
        is_image = path.is_file() and path.name.lower().endswith(IMAGE_SUFFIXES)
        if not is_image and not path.is_dir():
            continue
        name = case_id(path)
        if images.resolve() == labels.resolve() and label_suffix and name.endswith(label_suffix):
            continue  # the label file itself when images and labels share a folder
        if name not in label_files:
            if images.resolve() == labels.resolve():
                continue  # e.g. the phantom writer's dense <name>_labels.mha beside the CT
            raise InputError(f"{path}: no label volume {name}{label_suffix}.* in {labels}")
        pairs.append(Pair(name, path, label_files[name]))
    if not pairs:
        raise InputError(f"{images}: no CT volumes with label volumes found")
    return pairs


def _same_grid(a: Geometry, b: Geometry) -> bool:
    return (
        a.size_xyz == b.size_xyz
        and np.allclose(a.spacing_mm, b.spacing_mm, rtol=1e-4, atol=1e-5)
        and np.allclose(a.origin_mm, b.origin_mm, atol=1e-3 * max(a.spacing_mm))
        and np.allclose(a.direction, b.direction, atol=1e-4)
    )


def _oriented(array_zyx: np.ndarray, geometry: Geometry, frame: str) -> sitk.Image:
    return sitk.DICOMOrient(geometry.apply_to(sitk.GetImageFromArray(array_zyx)), frame)


def read_pair(pair: Pair, *, frame: str, ignore_value: int) -> tuple[sitk.Image, sitk.Image]:
    """CT (int16/float32 HU) and labels (uint8) of one case, both reoriented to `frame`."""
    ct, geometry = read_ct(pair.image)
    label_image = read_image(pair.labels)
    if label_image.GetDimension() != 3 or label_image.GetNumberOfComponentsPerPixel() != 1:
        raise InputError(f"{pair.labels}: expected a 3D scalar label volume")
    label_geometry = Geometry.from_image(label_image)
    if not _same_grid(geometry, label_geometry):
        raise InputError(
            f"{pair.labels}: label grid (size {label_geometry.size_xyz}, spacing {label_geometry.spacing_mm}, origin "
            f"{label_geometry.origin_mm}) does not match the CT {pair.image} (size {geometry.size_xyz}, spacing "
            f"{geometry.spacing_mm}, origin {geometry.origin_mm})"
        )
    labels = sitk.GetArrayFromImage(label_image)
    if not np.issubdtype(labels.dtype, np.integer):
        if not np.all(labels == np.round(labels)):
            raise InputError(f"{pair.labels}: label values must be integers")
    values = set(np.unique(labels).tolist())
    unknown = sorted(v for v in values if v != 0 and v != ignore_value and v not in NAMES)
    if unknown:
        raise InputError(
            f"{pair.labels}: label values {unknown[:10]} are neither background 0, the ignore value {ignore_value} nor "
            f"canonical labels 1..{len(LABELS)} (common/labels.json)"
        )
    labels = np.where(labels == ignore_value, IGNORE, labels).astype(np.uint8)
    return _oriented(ct, geometry, frame), _oriented(labels, geometry, frame)


def annotated_slices(labels_zyx: np.ndarray) -> list[int]:
    """Slices (axis 0) holding at least one muscle label."""
    muscle = (labels_zyx > 0) & (labels_zyx != IGNORE)
    return [int(k) for k in np.nonzero(muscle.any(axis=(1, 2)))[0]]


def slice_image(volume: sitk.Image, array_zyx: np.ndarray, k: int) -> sitk.Image:
    """Slice k of `volume` as a one-slice 3D image: in-plane geometry kept, slice spacing SLICE_SPACING_MM."""
    image = sitk.GetImageFromArray(np.ascontiguousarray(array_zyx[k : k + 1]))
    spacing = volume.GetSpacing()
    image.SetSpacing((spacing[0], spacing[1], SLICE_SPACING_MM))
    image.SetOrigin(volume.TransformIndexToPhysicalPoint((0, 0, int(k))))
    image.SetDirection(volume.GetDirection())
    return image


def group_folds(cases: list[str], n_folds: int, seed: int = 12345) -> list[dict]:
    """nnU-Net splits_final.json content with all slices of a patient in the same fold."""
    rng = np.random.default_rng(seed)
    order = list(cases)
    rng.shuffle(order)
    folds = [order[i::n_folds] for i in range(n_folds)]
    return [{"train": sorted(c for j, f in enumerate(folds) if j != i for c in f), "val": sorted(folds[i])} for i in range(n_folds)]


def prepare(
    images: Path,
    labels: Path,
    out: Path,
    *,
    frame: str = "LPS",
    ignore_value: int = IGNORE,
    label_suffix: str = "",
    classes: str = "present",
    file_ending: str = ".nii.gz",
    n_folds: int = 5,
    overwrite: bool = False,
    log=print,
) -> dict:
    """Write the raw dataset; return a summary (cases, slices, classes)."""
    out = Path(out)
    match = DATASET_NAME.match(out.name)
    if not match:
        raise InputError(f"{out}: nnU-Net needs the dataset folder named DatasetNNN_Name (three digits), e.g. Dataset501_TrunkMuscle")
    frame = frame.upper()
    try:
        axes, _ = parse_frame(frame)
    except ValueError as error:
        raise InputError(f"--frame: {error}") from None
    if axes[2] != 2:
        raise InputError(f"--frame {frame}: the third letter must be S or I (slices must be axial)")
    if classes not in ("present", "all"):
        raise InputError(f"--classes must be 'present' or 'all', not {classes!r}")
    if file_ending not in (".nii.gz", ".mha", ".nrrd", ".nii"):
        raise InputError(f"--file-ending {file_ending}: use .nii.gz, .nii, .mha or .nrrd (nnU-Net's SimpleITKIO)")
    if out.exists() and any(out.iterdir()) and not overwrite:
        raise InputError(f"{out}: exists and is not empty (use --overwrite)")
    pairs = find_pairs(Path(images), Path(labels), label_suffix=label_suffix)

    written: list[tuple[str, str, sitk.Image, np.ndarray]] = []  # (slice case, patient, image, labels array)
    slices_info = {}
    present: set[int] = set()
    partly_annotated = 0
    patients = []
    for pair in pairs:
        ct_image, label_image = read_pair(pair, frame=frame, ignore_value=ignore_value)
        ct = sitk.GetArrayFromImage(ct_image)
        lab = sitk.GetArrayFromImage(label_image)
        picked = annotated_slices(lab)
        if not picked:
            log(f"{pair.case}: no annotated slice, skipped")
            continue
        patients.append(pair.case)
        for k in picked:
            name = f"{pair.case}_z{k:04d}"
            lab_k = lab[k]
            present.update(int(v) for v in np.unique(lab_k) if v not in (0, IGNORE))
            if (lab_k == IGNORE).any():
                partly_annotated += 1
            image = slice_image(ct_image, ct, k)
            written.append((name, pair.case, image, lab_k))
            slices_info[name] = {
                "patient": pair.case,
                "source_ct": str(pair.image),
                "source_labels": str(pair.labels),
                "slice_index_in_frame": k,
                "slice_position_mm": list(ct_image.TransformIndexToPhysicalPoint((0, 0, int(k)))),
                "slice_thickness_mm": float(ct_image.GetSpacing()[2]),
            }
        log(f"{pair.case}: {len(picked)} annotated slices ({Geometry.from_image(ct_image).spacing_mm[0]:.3f} x "
            f"{Geometry.from_image(ct_image).spacing_mm[1]:.3f} mm)")
    if not written:
        raise InputError(f"{labels}: no annotated slice in any label volume")

    images_tr, labels_tr = out / "imagesTr", out / "labelsTr"  # written only once every case has been read
    for folder in (images_tr, labels_tr):
        folder.mkdir(parents=True, exist_ok=True)
        for old in folder.iterdir():
            if old.is_file():
                old.unlink()
    canonical = sorted(present) if classes == "present" else sorted(NAMES)
    lut = np.zeros(256, dtype=np.uint8)
    for channel, value in enumerate(canonical, start=1):
        lut[value] = channel
    ignore_label = len(canonical) + 1 if partly_annotated else None
    lut[IGNORE] = ignore_label if ignore_label is not None else 0
    for name, _, image, lab_k in written:
        sitk.WriteImage(image, str(images_tr / f"{name}_0000{file_ending}"), useCompression=True)
        label = slice_image(image, lut[lab_k][None], 0)
        sitk.WriteImage(label, str(labels_tr / f"{name}{file_ending}"), useCompression=True)

    label_table = {"background": 0, **{NAMES[value]: channel for channel, value in enumerate(canonical, start=1)}}
    if ignore_label is not None:
        label_table["ignore"] = ignore_label
    dataset = {
        "name": match.group(2),
        "description": "Trunk muscles on sparse axial slices (T4-L4 level mid-slices), one 2D case per annotated slice; "
                       "written by training.prepare_nnunet",
        "channel_names": {"0": "CT"},
        "labels": label_table,
        "numTraining": len(written),
        "file_ending": file_ending,
        "overwrite_image_reader_writer": "SimpleITKIO",
        FRAME_KEY: frame,
    }
    (out / "dataset.json").write_text(json.dumps(dataset, indent=2) + "\n")
    n_folds = min(n_folds, len(patients))
    slice_cases = {p: [n for n, patient, *_ in written if patient == p] for p in patients}
    if n_folds >= 2:
        splits = [
            {"train": sorted(s for p in fold["train"] for s in slice_cases[p]), "val": sorted(s for p in fold["val"] for s in slice_cases[p])}
            for fold in group_folds(patients, n_folds)
        ]
        (out / "splits_final.json").write_text(json.dumps(splits, indent=1) + "\n")
    (out / "trunkseg_slices.json").write_text(json.dumps({"frame": frame, "ignore_value_in_sources": ignore_value, "slices": slices_info}, indent=1) + "\n")
    summary = {
        "dataset": str(out),
        "patients": len(patients),
        "slices": len(written),
        "partly_annotated_slices": partly_annotated,
        "classes": {NAMES[v]: c for c, v in enumerate(canonical, start=1)},
        "ignore_label": ignore_label,
        "frame": frame,
        "folds": n_folds if n_folds >= 2 else 0,
    }
    log(f"{out}: {len(written)} slices of {len(patients)} patients, {len(canonical)} classes"
        + (f", ignore label {ignore_label} ({partly_annotated} partly annotated slices)" if ignore_label else "")
        + f", frame {frame}")
    return summary


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=Path, required=True, help="folder of CT volumes (image files or DICOM series folders)")
    parser.add_argument("--labels", type=Path, required=True, help="folder of sparse label volumes, named like the CTs")
    parser.add_argument("--out", type=Path, required=True, help="nnUNet_raw/DatasetNNN_Name folder to write")
    parser.add_argument("--label-suffix", default="", help="label files are <case><suffix>.<ext> (e.g. _sparse)")
    parser.add_argument("--ignore-value", type=int, default=IGNORE, help=f"value of unannotated voxels (default {IGNORE})")
    parser.add_argument("--frame", default="LPS", help="axis frame to write every slice in (default LPS; third letter S or I)")
    parser.add_argument("--classes", choices=("present", "all"), default="present",
                        help="classes in dataset.json: the canonical labels present in the annotations (default), or all 22")
    parser.add_argument("--file-ending", default=".nii.gz", help="image format of the dataset (default .nii.gz)")
    parser.add_argument("--folds", type=int, default=5, help="patient-grouped folds for splits_final.json (default 5)")
    parser.add_argument("--overwrite", action="store_true", help="replace the files of an existing dataset folder")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        summary = prepare(
            args.images, args.labels, args.out, frame=args.frame, ignore_value=args.ignore_value, label_suffix=args.label_suffix,
            classes=args.classes, file_ending=args.file_ending, n_folds=args.folds, overwrite=args.overwrite,
            log=lambda m: print(m, file=sys.stderr, flush=True),
        )
    except TrunkSegError as error:
        print(f"error: {error}", file=sys.stderr)
        return error.exit_code
    print(json.dumps(summary, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
