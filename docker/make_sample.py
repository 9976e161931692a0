"""Lay out inputs the way Grand Challenge hands them to the containers, to test-run the images as it does.

    python docker/make_sample.py algorithm-input CT OUT             # OUT/images/ct/<image-pk>.mha + OUT/inputs.json
    python docker/make_sample.py evaluation-input OUT NAME=MASK...  # OUT/predictions.json + OUT/<job-pk>/output/...
    python docker/make_sample.py override-model PACKAGE OUT         # a copy of PACKAGE, version "override-test"

algorithm-input: the CT as Grand Challenge stores an upload: re-encoded as compressed <image-pk>.mha
(geometry and pixel type kept), listed in inputs.json under the socket ct-image with the name it was
uploaded as. evaluation-input: one succeeded job per NAME=MASK (NAME the input image's name, e.g.
phantom-demo.mha; MASK the segmentation the job wrote), listed in predictions.json in no particular
order, each mask at <job-pk>/output/images/muscle-segmentation/<output-image-pk>.mha. Image and job pks
are derived from the names (uuid5), so the same call writes the same files. Prints what it wrote as JSON.
Runs on the host or inside either image (only the standard library, and SimpleITK for a CT that is not
an .mha file already).
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import uuid
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
BUNDLED_CT = REPO / "samples" / "demo" / "ct" / "phantom-demo.mha"
# The ground truth as the evaluation phase's tarball holds it: sparse labels (255 = not annotated), levels.json
BUNDLED_TRUTH_DIR = REPO / "samples" / "demo" / "ground-truth"
BUNDLED_DENSE_TRUTH = REPO / "samples" / "demo" / "dense-truth" / "phantom-demo.mha"
CT_SLUG = "ct-image"
CT_RELATIVE_PATH = "images/ct"
OUTPUT_SLUG = "muscle-segmentation"
OUTPUT_RELATIVE_PATH = "images/muscle-segmentation"


def pk_for(kind: str, name: str) -> str:
    return str(uuid.uuid5(uuid.NAMESPACE_URL, f"trunkseg-sample/{kind}/{name}"))


def socket_value(slug: str, relative_path: str, kind: str, *, image_pk: str, name: str, pk: int) -> dict:
    """One socket value, as Grand Challenge's serializer writes it in inputs.json and predictions.json."""
    return {
        "interface": {"title": slug.replace("-", " ").title(), "description": "", "slug": slug, "kind": kind, "pk": pk,
                      "default_value": None, "super_kind": "Image", "relative_path": relative_path,
                      "overlay_segments": [], "look_up_table": None},
        "value": None, "file": None, "image": {"pk": image_pk, "name": name}, "pk": 100 + pk,
    }


def algorithm_input(ct: Path, out: Path, *, name: str | None = None) -> dict:
    """/input for the algorithm: the CT as <image-pk>.mha under images/ct, and inputs.json."""
    ct, out = Path(ct), Path(out)
    name = name or ct.name
    image_pk = pk_for("image", name)
    target = out / CT_RELATIVE_PATH / f"{image_pk}.mha"
    target.parent.mkdir(parents=True, exist_ok=True)
    if ct.name.lower().endswith(".mha"):
        shutil.copyfile(ct, target)
    else:  # Grand Challenge re-encodes other formats to compressed .mha, keeping geometry and pixel type
        import SimpleITK as sitk

        sitk.WriteImage(sitk.ReadImage(str(ct)), str(target), useCompression=True)
    inputs = [socket_value(CT_SLUG, CT_RELATIVE_PATH, "Image", image_pk=image_pk, name=name, pk=1)]
    (out / "inputs.json").write_text(json.dumps(inputs, indent=2) + "\n")
    return {"input": str(out), "ct": str(target), "image_pk": image_pk, "name": name, "case_id": image_pk}


def evaluation_input(out: Path, jobs: dict[str, Path]) -> dict:
    """/input for the evaluation: predictions.json with one succeeded job per {input image name: mask}."""
    from_labels = _overlay_segments()
    out = Path(out)
    entries = []
    for name, mask in jobs.items():
        job_pk, output_pk = pk_for("job", name), pk_for("output", name)
        target = out / job_pk / "output" / OUTPUT_RELATIVE_PATH / f"{output_pk}.mha"
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(mask, target)
        output = socket_value(OUTPUT_SLUG, OUTPUT_RELATIVE_PATH, "Segmentation", image_pk=output_pk, name=Path(mask).name, pk=2)
        output["interface"]["overlay_segments"] = from_labels
        entries.append({
            "pk": job_pk, "status": "Succeeded", "rendered_result_text": "", "started_at": None, "completed_at": None,
            "inputs": [socket_value(CT_SLUG, CT_RELATIVE_PATH, "Image", image_pk=pk_for("image", name), name=name, pk=1)],
            "outputs": [output],
        })
    entries.sort(key=lambda job: job["pk"])  # "in no particular order": not the order given
    (out / "predictions.json").write_text(json.dumps(entries, indent=2) + "\n")
    return {"input": str(out), "jobs": [job["pk"] for job in entries]}


def _overlay_segments() -> list[dict]:
    labels = json.loads((REPO / "common" / "labels.json").read_text())["labels"]
    return [{"name": name, "visible": True, "voxel_value": int(value)} for name, value in sorted(labels.items(), key=lambda kv: kv[1])]


def override_model(source: Path, dest: Path, *, version: str = "override-test") -> dict:
    """A copy of a model package with another version in its card, readable by any user: a stand-in for
    the model tarball Grand Challenge extracts to /opt/ml/model."""
    dest = Path(dest)
    shutil.copytree(source, dest)
    card = json.loads((dest / "model.json").read_text())
    card["version"] = version
    (dest / "model.json").write_text(json.dumps(card, indent=2) + "\n")
    for path in [dest, *dest.rglob("*")]:
        path.chmod(0o755 if path.is_dir() else 0o644)
    return {"model": str(dest), "identity": f"{card['name']}@{version}"}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="what", required=True)
    algorithm = sub.add_parser("algorithm-input", help="/input for the algorithm image")
    algorithm.add_argument("ct", type=Path)
    algorithm.add_argument("out", type=Path)
    algorithm.add_argument("--name", help="the name the CT was uploaded as (default: its file name)")
    evaluation = sub.add_parser("evaluation-input", help="/input for the evaluation image")
    evaluation.add_argument("out", type=Path)
    evaluation.add_argument("jobs", nargs="+", metavar="NAME=MASK")
    model = sub.add_parser("override-model", help="a model package for /opt/ml/model")
    model.add_argument("package", type=Path)
    model.add_argument("out", type=Path)
    args = parser.parse_args()
    if args.what == "algorithm-input":
        info = algorithm_input(args.ct, args.out, name=args.name)
    elif args.what == "evaluation-input":
        pairs = [job.split("=", 1) for job in args.jobs]
        if any(len(pair) != 2 or not all(pair) for pair in pairs):
            parser.error("each job is NAME=MASK")
        info = evaluation_input(args.out, {name: Path(mask) for name, mask in pairs})
    else:
        info = override_model(args.package, args.out)
    print(json.dumps(info))
    return 0


if __name__ == "__main__":
    sys.exit(main())
