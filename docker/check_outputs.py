"""Check what an image wrote against Grand Challenge's contract; one line per problem, exit 1 on any.

    python docker/check_outputs.py algorithm INPUT OUTPUT [--model-identity NAME@VERSION]
    python docker/check_outputs.py evaluation OUTPUT [--perfect]

INPUT is the algorithm's /input (one CT, as docker/make_sample.py algorithm-input lays it out), OUTPUT
what the image wrote to /output. Needs numpy and SimpleITK (both images have them), so it runs on the host or inside
an image. tests/test_containers.py uses the same functions.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))
OUTPUT_SLUG = "muscle-segmentation"


def _strict_json(path: Path):
    """JSON as the platform reads it: NaN and Infinity are not JSON."""

    def refuse(token):
        raise ValueError(f"{token} is not JSON")

    return json.loads(path.read_text(), parse_constant=refuse)


def check_algorithm_output(input_dir: Path, output_dir: Path, *, model_identity: str | None = None) -> list[str]:
    """The algorithm's /output for a Grand Challenge /input with one CT: exactly one mask named after the
    CT's image pk, single-channel uint8 with label values only, on the CT's grid; results.json strict JSON
    with that one case succeeded (and the model `model_identity`, when given)."""
    import numpy as np
    import SimpleITK as sitk

    from common.labels import BACKGROUND, LABELS

    input_dir, output_dir = Path(input_dir), Path(output_dir)
    socket = json.loads((input_dir / "inputs.json").read_text())[0]
    ct_path = input_dir / socket["interface"]["relative_path"] / f"{socket['image']['pk']}.mha"
    case_id = socket["image"]["pk"]
    problems = []
    folder = output_dir / "images" / OUTPUT_SLUG
    files = sorted(p.name for p in folder.iterdir()) if folder.is_dir() else []
    expected = f"{case_id}.mha"
    if files != [expected]:
        return [f"{folder}: expected exactly [{expected}], found {files}"]
    image = sitk.ReadImage(str(folder / expected))
    ct = sitk.ReadImage(str(ct_path))
    if image.GetPixelID() != sitk.sitkUInt8 or image.GetNumberOfComponentsPerPixel() != 1:
        problems.append(f"{expected}: pixel type {image.GetPixelIDTypeAsString()}, expected single-channel uint8")
    if image.GetSize() != ct.GetSize():
        problems.append(f"{expected}: size {image.GetSize()} differs from the CT's {ct.GetSize()}")
    for what in ("Spacing", "Origin", "Direction"):
        got, want = getattr(image, f"Get{what}")(), getattr(ct, f"Get{what}")()
        if not np.allclose(got, want, rtol=0, atol=1e-4):
            problems.append(f"{expected}: {what.lower()} {got} differs from the CT's {want}")
    allowed = {BACKGROUND, *LABELS.values()}
    values = set(np.unique(sitk.GetArrayViewFromImage(image)).tolist())
    if not values <= allowed:
        problems.append(f"{expected}: voxel values {sorted(values - allowed)} are not labels")
    results_path = output_dir / "results.json"
    try:
        results = _strict_json(results_path)
    except (OSError, ValueError) as error:
        return problems + [f"{results_path}: unreadable ({error})"]
    cases = results.get("cases", []) if isinstance(results, dict) else []
    if [c.get("case_id") for c in cases] != [case_id] or cases[0].get("status") != "succeeded":
        problems.append(f"{results_path}: expected one succeeded case {case_id}, got {[(c.get('case_id'), c.get('status')) for c in cases]}")
    if model_identity is not None and results.get("model", {}).get("identity") != model_identity:
        problems.append(f"{results_path}: model {results.get('model', {}).get('identity')!r}, expected {model_identity!r}")
    return problems


def check_evaluation_output(output_dir: Path, *, perfect: bool = False) -> list[str]:
    """metrics.json is strict JSON, a non-empty object, all numbers finite; with `perfect` (the predictions
    were the ground truth itself) the overall mean Dice is 1."""
    path = Path(output_dir) / "metrics.json"
    try:
        metrics = _strict_json(path)
    except (OSError, ValueError) as error:
        return [f"{path}: unreadable ({error})"]
    if not isinstance(metrics, dict) or not metrics:
        return [f"{path}: expected a non-empty JSON object, got {type(metrics).__name__}"]

    def numbers(value):
        if isinstance(value, dict):
            for v in value.values():
                yield from numbers(v)
        elif isinstance(value, list):
            for v in value:
                yield from numbers(v)
        elif isinstance(value, float):
            yield value

    if any(not math.isfinite(v) for v in numbers(metrics)):
        return [f"{path}: holds a non-finite number"]
    if perfect:
        try:
            mean = metrics["aggregates"]["dice"]["overall"]["mean"]
        except (KeyError, TypeError):
            return [f"{path}: has no aggregates.dice.overall.mean"]
        if mean is None or abs(mean - 1.0) > 1e-9:
            return [f"{path}: perfect predictions scored a mean Dice of {mean}, not 1"]
    return []


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="image", required=True)
    algorithm = sub.add_parser("algorithm")
    algorithm.add_argument("input", type=Path)
    algorithm.add_argument("output", type=Path)
    algorithm.add_argument("--model-identity")
    evaluation = sub.add_parser("evaluation")
    evaluation.add_argument("output", type=Path)
    evaluation.add_argument("--perfect", action="store_true", help="the predictions were the ground truth: expect mean Dice 1")
    args = parser.parse_args()
    if args.image == "algorithm":
        problems = check_algorithm_output(args.input, args.output, model_identity=args.model_identity)
    else:
        problems = check_evaluation_output(args.output, perfect=args.perfect)
    for problem in problems:
        print(f"check_outputs: {problem}", file=sys.stderr)
    if not problems:
        print(f"check_outputs: {args.image} output in {args.output} is as the contract says")
    return 1 if problems else 0


if __name__ == "__main__":
    raise SystemExit(main())
