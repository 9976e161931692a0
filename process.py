"""Trunk-muscle segmentation of CT: the algorithm container's entry point.

    python process.py                          # Grand Challenge: read /input, write /output
    python process.py --input DIR --output DIR # any folder: GC layout, or one case per CT file / DICOM folder

Writes <output>/images/<output-slug>/<case>.mha (uint8 labels on the input grid, labels in
model/labels.json) and <output>/results.json. Exit codes: 0 all cases done, 2 usage, 3 bad input,
4 bad model package, 5 output not writable, 6 runtime unavailable, 1 unexpected. A failed case
leaves no output of its own and one line on stderr; the other cases still run.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

from model.package import ModelPackage, load_model_package
from model.runtime import RUNTIMES, RuntimeChoice, choose_runtime, open_runtime
from model.segment import SegmentStats, segment_volume
from postprocess.measures import measure_muscles
from preprocess.errors import OutputError, TrunkSegError
from preprocess.geometry import Reorientation
from preprocess.inputs import Case, find_cases
from preprocess.io import read_ct, write_label_map

REPO = Path(__file__).resolve().parent
BUNDLED_MODEL = REPO / "model" / "packages" / "demo-phantom"
GC_MODEL = Path("/opt/ml/model")
OUTPUT_SLUG = "muscle-segmentation"


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def default_model() -> Path:
    """TRUNKSEG_MODEL, else Grand Challenge's model mount when it holds a package, else the bundled demo model."""
    if os.environ.get("TRUNKSEG_MODEL"):
        return Path(os.environ["TRUNKSEG_MODEL"])
    if (GC_MODEL / "model.json").is_file():
        return GC_MODEL
    return BUNDLED_MODEL


def progress_bar(total: int, label: str):
    """A tqdm bar on a terminal, nothing in a container log (stage times are logged instead)."""
    if sys.stderr.isatty():
        try:
            from tqdm import tqdm
        except ImportError:
            return None
        return tqdm(total=total, desc=label, unit="slice", file=sys.stderr, leave=False)
    return None


def run_case(case: Case, *, package: ModelPackage, runtime, choice: RuntimeChoice, output_dir: Path, slug: str, batch_size: int) -> dict:
    timings = {}
    started = time.perf_counter()
    volume, geometry = read_ct(case.source)
    timings["read"] = time.perf_counter() - started

    started = time.perf_counter()
    reorientation = Reorientation.between(geometry, package.card.frame)
    model_frame = reorientation.apply(volume)
    timings["reorient"] = time.perf_counter() - started

    stats = SegmentStats()
    bar = progress_bar(model_frame.shape[0], case.case_id)
    started = time.perf_counter()
    labels = segment_volume(
        model_frame, pixel_spacing_mm=reorientation.spacing_mm[:2], card=package.card, network=runtime,
        batch_size=batch_size, progress=bar.update if bar else None, stats=stats, slice_spacing_mm=reorientation.spacing_mm[2],
    )
    if bar:
        bar.close()
    timings["segment"] = time.perf_counter() - started
    timings.update({f"segment.{k}": v for k, v in stats.seconds.items()})

    started = time.perf_counter()
    labels = reorientation.invert(labels)
    muscles = measure_muscles(labels, volume, geometry)
    timings["measure"] = time.perf_counter() - started

    started = time.perf_counter()
    output = output_dir / "images" / slug / f"{case.case_id}.mha"
    write_label_map(labels, geometry, output)
    timings["write"] = time.perf_counter() - started
    n_slices = geometry.shape_zyx[0]
    log(
        f"{case.case_id}: {n_slices} slices ({geometry.orientation_code()}, {geometry.spacing_mm[0]:.2f}x{geometry.spacing_mm[1]:.2f}x"
        f"{geometry.spacing_mm[2]:.2f} mm) in {sum(v for k, v in timings.items() if '.' not in k):.1f} s: "
        + ", ".join(f"{k} {v:.2f} s" for k, v in timings.items() if "." not in k)
        + f"; {stats.tiles} tiles, {1000 * timings['segment'] / max(1, n_slices):.0f} ms/slice -> {output}"
    )
    return {
        "case_id": case.case_id,
        "status": "succeeded",
        "input": str(case.source),
        "output": str(output.relative_to(output_dir)),
        "runtime": choice.name,
        "model": package.card.identity,
        "input_frame": geometry.orientation_code(),
        "shape_zyx": list(geometry.shape_zyx),
        "spacing_mm": list(geometry.spacing_mm),
        "timings_s": {k: round(v, 3) for k, v in timings.items()},
        "muscles": muscles,
    }


def write_json_atomically(data: dict, path: Path) -> None:
    temp = path.with_name(f".partial-{path.name}")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        temp.write_text(json.dumps(data, indent=2, allow_nan=False) + "\n")
        os.replace(temp, path)
    except OSError as error:
        temp.unlink(missing_ok=True)
        raise OutputError(f"{path}: cannot write ({error.strerror})") from None


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--input", type=Path, default=Path("/input"), help="input folder (default /input)")
    parser.add_argument("--output", type=Path, default=Path("/output"), help="output folder (default /output)")
    parser.add_argument("--model", type=Path, default=None, help="model package folder (default: $TRUNKSEG_MODEL, /opt/ml/model, the bundled demo model)")
    parser.add_argument("--runtime", choices=RUNTIMES, default=os.environ.get("TRUNKSEG_RUNTIME", "auto"))
    parser.add_argument("--input-slug", default=None, help="image socket slug to read when several are present")
    parser.add_argument("--output-slug", default=OUTPUT_SLUG, help=f"output socket slug (default {OUTPUT_SLUG})")
    parser.add_argument("--batch-size", type=int, default=4, help="tiles per network call")
    parser.add_argument("--threads", type=int, default=len(os.sched_getaffinity(0)), help="CPU threads for the runtime")
    args = parser.parse_args(argv)
    if args.batch_size < 1 or args.threads < 1:
        parser.error("--batch-size and --threads must be >= 1")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        cases = find_cases(args.input, slug=args.input_slug)
        package = load_model_package(args.model or default_model())
        choice = choose_runtime(args.runtime)
        log(f"model {package.card.identity} from {package.folder}; runtime {choice.name} ({choice.reason}); {len(cases.cases)} case(s), {cases.layout} layout")
        results = {"model": {"identity": package.card.identity, "folder": str(package.folder), "description": package.card.description},
                   "runtime": {"name": choice.name, "reason": choice.reason}, "output_slug": args.output_slug, "cases": []}
        exit_code = 0
        with open_runtime(choice, package, threads=args.threads) as runtime:
            for case in cases.cases:
                try:
                    results["cases"].append(run_case(case, package=package, runtime=runtime, choice=choice, output_dir=args.output, slug=args.output_slug, batch_size=args.batch_size))
                except TrunkSegError as error:
                    log(f"error: {error}")
                    results["cases"].append({"case_id": case.case_id, "status": "failed", "input": str(case.source), "error": str(error)})
                    exit_code = exit_code or error.exit_code
        write_json_atomically(results, args.output / "results.json")
        return exit_code
    except TrunkSegError as error:
        log(f"error: {error}")
        return error.exit_code


if __name__ == "__main__":
    raise SystemExit(main())
