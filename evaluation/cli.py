"""Command line of the evaluation: Grand Challenge evaluation method by default, local tool with --predictions.

    python -m evaluation                                   # /input/predictions.json, /opt/ml/input/data/ground_truth -> /output
    python -m evaluation --predictions DIR --ground-truth DIR --output DIR   # files paired by name

Exit codes: 0 scored, 2 usage or configuration, 3 bad input (unreadable or inconsistent files, missing
predictions, a case that cannot be scored), 5 output not writable, 1 unexpected. On any error: one line
on stderr starting "error:", and no metrics.json written.
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from pathlib import Path

from evaluation import __version__
from evaluation.cases import (
    Pairing,
    find_mapping_file,
    list_images,
    pair_grand_challenge,
    pair_local,
)
from evaluation.errors import ConfigError, InputError, OutputError, TrunkSegError
from evaluation.evaluate import Settings, default_workers, evaluate_cases
from evaluation.labels import (
    DEFAULT_IGNORE,
    canonical_label_set,
    load_label_set,
    with_ignore,
)
from evaluation.levels import load_level_table, order_levels
from evaluation.paper_table import TABLE_MARKDOWN, load_published, render_paper_table
from evaluation.report import (
    FIGURE_FILE,
    build_metrics,
    render_figure,
    render_slices_csv,
    write_outputs,
)
from common.atomic import write_bytes_atomically
from common.labels import LEVELS

GC_INPUT = Path("/input")
GC_GROUND_TRUTH = Path("/opt/ml/input/data/ground_truth")
GC_OUTPUT = Path("/output")
DEFAULT_INPUT_SLUG = "ct-image"
DEFAULT_OUTPUT_SLUG = "muscle-segmentation"
DEFAULT_TOLERANCE_MM = 2.0
LABEL_FILE_NAMES = ("dataset.json", "labels.json")
LEVEL_FILE_NAMES = ("levels.csv", "levels.json")
LEVEL_VOLUME_FOLDER = "levels"


def log(message: str, *, quiet: bool = False) -> None:
    if not quiet:
        print(message, file=sys.stderr, flush=True)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m evaluation",
        description="Score trunk-muscle segmentations against sparse ground truth (only annotated voxels count).",
        epilog="Without --predictions it runs as a Grand Challenge evaluation method. See evaluation/README.md.",
    )
    source = parser.add_mutually_exclusive_group()
    source.add_argument("--input", type=Path, default=None, help=f"Grand Challenge input folder with predictions.json (default {GC_INPUT})")
    source.add_argument("--predictions", type=Path, default=None, help="local mode: folder of prediction label volumes, paired with the ground truth by file name")
    parser.add_argument("--ground-truth", type=Path, default=GC_GROUND_TRUTH, help=f"folder of ground-truth label volumes (default {GC_GROUND_TRUTH})")
    parser.add_argument("--output", type=Path, default=GC_OUTPUT, help=f"where metrics.json, the per-slice CSV and the figure go (default {GC_OUTPUT})")
    parser.add_argument("--labels", type=Path, default=None, help="labels file (product table, nnU-Net dataset.json or {name: value}); default: dataset.json or labels.json in the ground-truth folder, else common/labels.json")
    parser.add_argument("--ignore-value", type=int, default=None, help=f"ground-truth value of unannotated voxels (default: the labels file's, else {DEFAULT_IGNORE})")
    parser.add_argument("--tolerance-mm", type=float, default=DEFAULT_TOLERANCE_MM, help=f"normalised surface Dice tolerance in mm (default {DEFAULT_TOLERANCE_MM})")
    parser.add_argument("--levels", type=Path, default=None, help="levels file (CSV case_id,slice_index,level or JSON); default: levels.csv or levels.json in the ground-truth folder")
    parser.add_argument("--level-labels", type=Path, default=None, help=f"folder of vertebra label volumes, one per case (1..13 = T4..L4); default: {LEVEL_VOLUME_FOLDER}/ in the ground-truth folder")
    parser.add_argument("--mapping", type=Path, default=None, help="mapping file from prediction or input image names to ground-truth case ids; default: mapping.json or mapping.csv in the ground-truth folder")
    parser.add_argument("--input-slug", default=DEFAULT_INPUT_SLUG, help=f"Grand Challenge: slug of the CT input socket (default {DEFAULT_INPUT_SLUG})")
    parser.add_argument("--output-slug", default=DEFAULT_OUTPUT_SLUG, help=f"Grand Challenge: slug of the segmentation output socket (default {DEFAULT_OUTPUT_SLUG})")
    parser.add_argument("--allow-missing", action="store_true", help="score a case without a prediction as an empty prediction (0) instead of failing")
    parser.add_argument("--workers", type=int, default=None, help="parallel worker processes (default: CPUs, capped by GRAND_CHALLENGE_MAX_WORKERS)")
    parser.add_argument("--published", type=Path, default=None, help=f"CSV of the paper's published Dice (header name,dice[,sd]): writes {TABLE_MARKDOWN} (and .csv), the paper's table beside ours; see docs/reproduce.md")
    parser.add_argument("--paper-table", action="store_true", help=f"write {TABLE_MARKDOWN} (and .csv) without published figures")
    parser.add_argument("--no-figure", action="store_true", help=f"do not draw {FIGURE_FILE}")
    parser.add_argument("--quiet", action="store_true", help="no progress lines on stderr")
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    return parser


def _one_of(folder: Path, names: tuple[str, ...], what: str) -> Path | None:
    present = [folder / name for name in names if (folder / name).is_file()]
    if len(present) > 1:
        raise ConfigError(f"{folder}: more than one {what} ({', '.join(p.name for p in present)}); keep one or pass it explicitly")
    return present[0] if present else None


def resolve_settings(args: argparse.Namespace) -> Settings:
    truth_dir: Path = args.ground_truth
    if not math.isfinite(args.tolerance_mm) or args.tolerance_mm <= 0:
        raise ConfigError(f"--tolerance-mm must be a positive number of mm, got {args.tolerance_mm}")
    labels_path = args.labels or (_one_of(truth_dir, LABEL_FILE_NAMES, "labels file") if truth_dir.is_dir() else None)
    label_set = load_label_set(labels_path) if labels_path else canonical_label_set()
    if args.ignore_value is not None:
        if not 0 < args.ignore_value <= 65535:
            raise ConfigError(f"--ignore-value must be 1..65535, got {args.ignore_value}")
        label_set = with_ignore(label_set, args.ignore_value)
    elif label_set.ignore is None:
        label_set = with_ignore(label_set, DEFAULT_IGNORE)
    levels_path = args.levels or (_one_of(truth_dir, LEVEL_FILE_NAMES, "levels file") if truth_dir.is_dir() else None)
    level_table = load_level_table(levels_path) if levels_path else None
    level_dir = args.level_labels or (truth_dir / LEVEL_VOLUME_FOLDER if (truth_dir / LEVEL_VOLUME_FOLDER).is_dir() else None)
    level_volumes = None
    if level_dir is not None:
        level_volumes = list_images(level_dir, what="vertebra label")
        if not level_volumes:
            raise ConfigError(f"{level_dir}: no vertebra label volumes")
    names: tuple[str, ...] = ()
    if level_table is not None or level_volumes:
        names = order_levels((level_table.names if level_table else ()) + (LEVELS if level_volumes else ()))
    return Settings(label_set=label_set, tolerance_mm=float(args.tolerance_mm), level_names=names, level_table=level_table, level_volumes=level_volumes)


def pair_cases(args: argparse.Namespace) -> Pairing:
    mapping = args.mapping or (find_mapping_file(args.ground_truth) if args.ground_truth.is_dir() else None)
    if args.predictions is not None:
        return pair_local(args.predictions, args.ground_truth, mapping_path=mapping)
    return pair_grand_challenge(args.input or GC_INPUT, args.ground_truth, input_slug=args.input_slug, output_slug=args.output_slug, mapping_path=mapping)


def run(args: argparse.Namespace) -> int:
    started = time.perf_counter()
    quiet = args.quiet
    if args.output.exists() and not args.output.is_dir():
        raise OutputError(f"{args.output}: output is not a folder")
    settings = resolve_settings(args)
    published = load_published(args.published, settings) if args.published is not None else None
    pairing = pair_cases(args)
    for note in pairing.notes:
        log(f"warning: {note}")
    if pairing.missing and not args.allow_missing:
        raise InputError(
            f"no prediction for {len(pairing.missing)} case(s) with ground truth: {', '.join(pairing.missing[:20])}"
            + (" ..." if len(pairing.missing) > 20 else "") + " (--allow-missing scores them 0)"
        )
    if pairing.missing:
        log(f"warning: no prediction for {', '.join(pairing.missing)}: scored as empty predictions (--allow-missing)")
    workers = args.workers if args.workers is not None else default_workers()
    if workers < 1:
        raise ConfigError(f"--workers must be at least 1, got {workers}")
    log(
        f"evaluation {__version__}: {len(pairing.cases)} case(s), labels {settings.label_set.source} ({len(settings.label_set.values)}, "
        f"ignore {settings.label_set.ignore}), NSD tolerance {settings.tolerance_mm:g} mm, "
        f"levels: {', '.join(settings.level_names) or 'none'}, {workers} worker(s)",
        quiet=quiet,
    )

    def progress(case, outcome) -> None:
        if isinstance(outcome, TrunkSegError):
            log(f"{case.case_id}: failed: {outcome.reason if hasattr(outcome, 'reason') else outcome}", quiet=quiet)
            return
        mean = outcome.scores.per_case.dice[0]
        scored = mean[mean == mean]
        dice = f"mean Dice {scored.mean():.3f} over {scored.size} muscle(s)" if scored.size else "no muscle scored"
        extra = "" if outcome.grid in ("same", None) else f", resampled (coverage {outcome.coverage:.0%})"
        log(f"{case.case_id}: {outcome.slice_indices.size} annotated slice(s), {dice}{extra}, {sum(outcome.seconds.values()):.2f} s"
            + (" [missing prediction]" if outcome.status != "scored" else ""), quiet=quiet)

    results, failures = evaluate_cases(list(pairing.cases), settings, workers=workers, progress=progress)
    if failures:
        details = "; ".join(str(f) for f in failures[:10]) + (" ..." if len(failures) > 10 else "")
        raise InputError(f"{len(failures)} of {len(pairing.cases)} case(s) could not be scored: {details}")
    run_info = {
        "mode": "local" if args.predictions is not None else "grand-challenge",
        "predictions": str(args.predictions if args.predictions is not None else (args.input or GC_INPUT)),
        "ground_truth": str(args.ground_truth),
        "allow_missing": bool(args.allow_missing),
        "missing_predictions": list(pairing.missing),
        "notes": list(pairing.notes),
    }
    metrics = build_metrics(results, settings, run_info=run_info)
    figure = None if args.no_figure else render_figure(results, settings)
    tables = []
    if published is not None or args.paper_table:  # before metrics.json, which write_outputs writes last
        for name, content in render_paper_table(results, settings, published).items():
            write_bytes_atomically(args.output / name, content)
            tables.append(args.output / name)
    written = tables + write_outputs(args.output, metrics=metrics, slices_csv=render_slices_csv(results, settings), figure_png=figure)
    overall = metrics["aggregates"]["dice"]["overall"]
    summary = f"mean Dice {overall['mean']:.4f} (n={overall['n']})" if overall["mean"] is not None else "no muscle scored"
    log(f"{summary}; wrote {', '.join(str(p) for p in written)} in {time.perf_counter() - started:.1f} s", quiet=quiet)
    return 0


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return run(args)
    except TrunkSegError as error:
        print(f"error: {error}", file=sys.stderr, flush=True)
        return error.exit_code
    except KeyboardInterrupt:
        print("error: interrupted", file=sys.stderr, flush=True)
        return 130


if __name__ == "__main__":
    raise SystemExit(main())
