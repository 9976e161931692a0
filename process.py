"""Trunk-muscle segmentation of CT: the algorithm container's entry point.

    python process.py                          # Grand Challenge: read /input, write /output
    python process.py --input DIR --output DIR # any folder: GC layout, or one case per CT file / DICOM study (any depth)
    python process.py -i ct.nii.gz -o out/     # also one image file, a DICOMDIR, a .zip (docs/inputs.md)
    python process.py --input DIR --output DIR/shard-0 --shard 0/4   # a quarter of a folder (docs/clusters.md)

Writes <output>/images/<output-slug>/<case>.mha (uint8 labels on the input grid, labels in
common/labels.json; outside Grand Challenge's layout in the input's format family or --format, with
viewers/ colour tables for 3D Slicer and ITK-SNAP), the case's measures (measures/<case>.csv), QC picture (qc/<case>.png; in Grand
Challenge's layout the Thumbnail PNG at --qc-path), DICOM-SEG for DICOM input (dicom-seg/<case>.dcm) and
with --nifti nifti/<case>.nii.gz (docs/outputs.md), and <output>/results.json. Exit codes: 0 all cases done, 2 usage, 3 bad input,
4 bad model package, 5 output not writable or full, 6 runtime unavailable, 7 a case exceeded the
memory budget (refused from its header) or the time budget (stopped), 1 unexpected. A failed case
leaves no output of its own and one line on stderr; the other cases still run (after an output
error the run stops: the output cannot take more).
"""

from __future__ import annotations

import argparse
import os
import re
import signal
import sys
import threading
import time
import traceback
from contextlib import ExitStack
from functools import partial
from pathlib import Path

from model.package import PHANTOM_WARNING, ModelPackage, find_mounted_package, is_phantom_only, load_model_package
from model.runtimes.choice import RUNTIMES, RuntimeChoice, segmenter_for, start_chosen_runtime
from model.runtimes.precision import PRECISIONS
from model.segment import SegmentStats
from postprocess import __version__ as POSTPROCESS_VERSION
from postprocess.dicom_seg import SEGMENTATION_TYPES
from postprocess.outputs import StagedOutputs, check_output_writable, list_files, remove_new_files
from postprocess.progress import Progress, terminal_bar
from postprocess.records import find_complete_records, forget_record, remove_partial_files, write_record
from postprocess.report import MASK_FORMATS, ReportOptions, load_vertebrae, mask_suffix, write_case_report
from common.atomic import write_json_atomically
from common.errors import LimitError, OutputError, TerminatedError, TrunkSegError, UsageError
from preprocess.archive import is_archive, unpacked_archive
from preprocess.geometry import Reorientation
from preprocess.inputs import Case, find_cases, vertebrae_maps
from preprocess.io import read_ct, write_label_map
from preprocess.limits import DEFAULT_CASE_TIME_LIMIT_S, CaseTimer, detect_granted_cpus, memory_budget
from preprocess.readahead import ReadAhead
from preprocess.shards import choose_shard, select_cases
from preprocess.study import SeriesRule
from preprocess.vertebrae import SCHEMES

REPO = Path(__file__).resolve().parent
BUNDLED_MODEL = REPO / "model" / "packages" / "demo-phantom"
GC_MODEL = Path("/opt/ml/model")
OUTPUT_SLUG = "muscle-segmentation"
VERTEBRAE_SLUG = "vertebrae-segmentation"
QC_PATH = "muscle-qc.png"


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def default_model() -> Path:
    """TRUNKSEG_MODEL, else the package in Grand Challenge's model mount (there or one folder down; a mount holding
    anything else is refused, exit 4), else, when the mount is missing or empty, the bundled demo model."""
    if os.environ.get("TRUNKSEG_MODEL"):
        return Path(os.environ["TRUNKSEG_MODEL"])
    mounted = find_mounted_package(GC_MODEL)
    return mounted if mounted is not None else BUNDLED_MODEL


def run_case(case: Case, *, package: ModelPackage, runtime, choice: RuntimeChoice, output_dir: Path, slug: str, batch_size: int,
             reader: ReadAhead, next_case: Case | None = None, report: ReportOptions = ReportOptions(), vertebrae: Path | None = None) -> dict:
    timings = {}
    started = time.perf_counter()
    volume, geometry = reader.read(case.source)
    if next_case is not None:  # its file is decoded while this case computes
        reader.start(next_case.source, beside=(volume, geometry))
    vertebrae = case.vertebrae or vertebrae
    vertebrae_zyx = load_vertebrae(vertebrae, geometry, report)
    timings["read"] = time.perf_counter() - started

    started = time.perf_counter()
    reorientation = Reorientation.between(geometry, package.card.frame)
    model_frame = reorientation.apply(volume)
    timings["reorient"] = time.perf_counter() - started

    stats = SegmentStats()
    bar = terminal_bar(model_frame.shape[0], label=case.case_id, unit="slice", leave=False)
    started = time.perf_counter()
    segment, network, batch_size = segmenter_for(runtime, batch_size)  # a GPU runtime: the whole pipeline on its device
    labels = segment(
        model_frame, pixel_spacing_mm=reorientation.spacing_mm[:2], card=package.card, network=network,
        batch_size=batch_size, progress=bar.update if bar else None, stats=stats, slice_spacing_mm=reorientation.spacing_mm[2],
    )
    if bar:
        bar.close()
    timings["segment"] = time.perf_counter() - started
    timings.update({f"segment.{k}": v for k, v in stats.seconds.items()})

    labels = reorientation.invert(labels)
    output = output_dir / "images" / slug / f"{case.case_id}{mask_suffix(case.source, report)}"
    with StagedOutputs() as staged:  # the mask and every report appear together, or none of them
        started = time.perf_counter()
        reports = write_case_report(
            case_id=case.case_id, labels_zyx=labels, hu_zyx=volume, geometry=geometry, source=case.source, vertebrae=vertebrae,
            vertebrae_zyx=vertebrae_zyx, options=report, output_dir=output_dir, staged=staged, model_identity=package.card.identity,
            software_version=POSTPROCESS_VERSION,
        )
        timings["measure"] = time.perf_counter() - started
        started = time.perf_counter()
        write_label_map(labels, geometry, staged.path_for(output))
    timings["write"] = time.perf_counter() - started
    n_slices = geometry.shape_zyx[0]
    log(
        f"{case.case_id}: {n_slices} slices ({geometry.orientation_code()}, {geometry.spacing_mm[0]:.2f}x{geometry.spacing_mm[1]:.2f}x"
        f"{geometry.spacing_mm[2]:.2f} mm) in {sum(v for k, v in timings.items() if '.' not in k):.1f} s: "
        + ", ".join(f"{k} {v:.2f} s" for k, v in timings.items() if "." not in k)
        + f"; {stats.tiles} tiles, {1000 * timings['segment'] / max(1, n_slices):.0f} ms/slice -> {output}"
    )
    warning = PHANTOM_WARNING if is_phantom_only(package.card) else None
    if warning:
        log(f"warning: {case.case_id}: {warning}")
    return {
        "case_id": case.case_id,
        "status": "succeeded",
        **({"warning": warning} if warning else {}),
        "input": str(case.source),
        **({"case_id_from": case.id_from} if case.id_from else {}),
        **({"series": case.selection} if case.selection else {}),
        "output": str(output.relative_to(output_dir)),
        "runtime": choice.name,
        "model": package.card.identity,
        "input_frame": geometry.orientation_code(),
        "shape_zyx": list(geometry.shape_zyx),
        "spacing_mm": list(geometry.spacing_mm),
        "timings_s": {k: round(v, 3) for k, v in timings.items()},
        **reports,
    }


def describe_failure(error: BaseException, case: Case) -> tuple[str, int]:
    """One line and an exit code for a case that failed."""
    if isinstance(error, TrunkSegError):
        return str(error), error.exit_code
    if isinstance(error, MemoryError):
        return (f"{case.source}: ran out of memory (lower --memory-limit-gb to refuse such volumes up front, "
                f"or give the job more memory)"), LimitError.exit_code
    if os.environ.get("TRUNKSEG_DEBUG"):
        traceback.print_exc()
    reason = " ".join(str(error).split())[:300]
    return f"{case.source}: unexpected {type(error).__name__}: {reason} (set TRUNKSEG_DEBUG=1 for the traceback)", 1


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("-i", "--input", type=Path, default=Path("/input"),
                        help="a folder (Grand Challenge's layout, or any tree of CT files and DICOM studies), one image file, a DICOMDIR, "
                             "or a .zip of any of these (default /input; docs/inputs.md)")
    parser.add_argument("-o", "--output", type=Path, default=Path("/output"), help="output folder (default /output)")
    parser.add_argument("--model", type=Path, default=None, help="model package folder (default: $TRUNKSEG_MODEL, /opt/ml/model, the bundled demo model)")
    parser.add_argument("--runtime", choices=RUNTIMES, default=os.environ.get("TRUNKSEG_RUNTIME", "auto"))
    parser.add_argument("--precision", choices=PRECISIONS, default=os.environ.get("TRUNKSEG_PRECISION", "auto"),
                        help="network precision (default auto: the runtime's fastest mode that the model card records as "
                             "agreeing with fp32 on this model, else fp32; $TRUNKSEG_PRECISION)")
    parser.add_argument("--input-slug", default=None, help="image socket slug to read when several are present")
    parser.add_argument("--output-slug", default=OUTPUT_SLUG, help=f"output socket slug (default {OUTPUT_SLUG})")
    parser.add_argument("--vertebrae", type=Path, default=None,
                        help="vertebra label map given with the CT, for per-level measures: a file (one case) or a folder of <case>.<ext> files")
    parser.add_argument("--vertebra-labels", choices=sorted(SCHEMES), default="totalsegmentator",
                        help="what the vertebra map's values mean (default totalsegmentator: 26 S1 .. 50 C1; levels: 1..13 = T4..L4)")
    parser.add_argument("--vertebrae-slug", default=VERTEBRAE_SLUG, help=f"Grand Challenge socket slug of the vertebra labels (default {VERTEBRAE_SLUG})")
    parser.add_argument("--qc-path", default=QC_PATH, help=f"Grand Challenge layout: relative path of the QC picture, the Thumbnail PNG socket (default {QC_PATH})")
    parser.add_argument("--series-uid", default=None, help="DICOM: segment the series of this SeriesInstanceUID instead of the rule's choice")
    parser.add_argument("--series-description", default=None, metavar="REGEX",
                        help="DICOM: choose only among the series whose SeriesDescription matches REGEX (any case)")
    parser.add_argument("--all-series", action="store_true", help="DICOM: every axial CT series of a study is a case of its own")
    parser.add_argument("--format", choices=["auto", *MASK_FORMATS], default="auto",
                        help="the mask's file format outside Grand Challenge's layout (default auto, the input's: NIfTI -> nii.gz, "
                             ".mha -> mha, .nrrd -> nrrd, DICOM -> nii.gz beside the DICOM-SEG)")
    parser.add_argument("--nifti", action="store_true", help="also write the label map as nifti/<case>.nii.gz")
    parser.add_argument("--dicom-seg-type", choices=SEGMENTATION_TYPES, default="binary",
                        help="DICOM-SEG for DICOM input: binary (default: read by every SEG viewer; about 0.7 MB per slice for 22 muscles) "
                             "or labelmap (DICOM 2024: one JPEG-LS frame per slice, small; OHIF 3.11+, not yet every viewer or PACS)")
    parser.add_argument("--no-dicom-seg", action="store_true", help="no DICOM-SEG for DICOM input (when its headers do not allow one)")
    parser.add_argument("--batch-size", type=int, default=None, help="tiles per network call (default 4 on the CPU, 16 on a GPU)")
    parser.add_argument("--threads", type=int, default=None,
                        help="CPU threads for the runtime (default: the CPUs the scheduler grants: cpuset, cgroup quota, SLURM_CPUS_PER_TASK)")
    parser.add_argument("--memory-limit-gb", type=float, default=_env_float("TRUNKSEG_MEMORY_LIMIT_GB"),
                        help="refuse, from its header, a case whose estimated peak memory exceeds this (GiB; default: the "
                             "container's memory limit, else physical memory; $TRUNKSEG_MEMORY_LIMIT_GB)")
    parser.add_argument("--time-limit-s", type=float, default=_env_float("TRUNKSEG_TIME_LIMIT_S", DEFAULT_CASE_TIME_LIMIT_S),
                        help=f"stop a case after this many seconds, 0 for none (default {DEFAULT_CASE_TIME_LIMIT_S}: Grand Challenge's "
                             f"default job limit of 3600 s less 5 min; $TRUNKSEG_TIME_LIMIT_S)")
    parser.add_argument("--shard", default=None, metavar="I/N",
                        help="do shard I of N (0 <= I < N) of the folder's cases, assigned by case id (docs/clusters.md); default: "
                             "from SLURM_ARRAY_TASK_ID/SLURM_ARRAY_TASK_COUNT or JOB_COMPLETION_INDEX with --shard-count")
    parser.add_argument("--shard-count", type=int, default=_env_int("TRUNKSEG_SHARD_COUNT"),
                        help="number of shards when the index comes from JOB_COMPLETION_INDEX ($TRUNKSEG_SHARD_COUNT)")
    parser.add_argument("--skip-existing", action=argparse.BooleanOptionalAction, default=None,
                        help="skip cases whose outputs are complete in --output (results/<case>.json), redo half-written ones "
                             "(default: on for a shard, off otherwise)")
    args = parser.parse_args(argv)
    grant = detect_granted_cpus() if args.threads is None else None
    args.threads, args.threads_origin = (grant.count, grant.origin) if grant else (args.threads, "--threads")
    if (args.batch_size is not None and args.batch_size < 1) or args.threads < 1:
        parser.error("--batch-size and --threads must be >= 1")
    if (args.memory_limit_gb is not None and not args.memory_limit_gb > 0) or not args.time_limit_s >= 0:
        parser.error("--memory-limit-gb must be > 0 and --time-limit-s >= 0")
    if args.series_description is not None:
        try:
            re.compile(args.series_description)
        except re.error as error:
            parser.error(f"--series-description {args.series_description!r} is not a regular expression ({error})")
    qc = Path(args.qc_path)
    if qc.suffix != ".png" or qc.is_absolute() or ".." in qc.parts or qc.parts[0] == "images":
        parser.error("--qc-path must be a relative .png path outside images/ (a Thumbnail PNG socket's relative_path)")
    return args


def _env_float(name: str, default: float | None = None) -> float | None:
    text = os.environ.get(name, "").strip()
    if not text:
        return default
    try:
        return float(text)
    except ValueError:
        raise SystemExit(f"error: ${name}={text!r} is not a number") from None


def _env_int(name: str) -> int | None:
    value = _env_float(name)
    if value is not None and value != int(value):
        raise SystemExit(f"error: ${name}={os.environ[name]!r} is not a whole number")
    return None if value is None else int(value)


def stop_on_sigterm(signum, frame):
    signal.signal(signal.SIGTERM, signal.SIG_DFL)  # a second SIGTERM ends the process at once
    raise TerminatedError("stopped by SIGTERM: the case in progress was discarded")


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if threading.current_thread() is not threading.main_thread():  # signal handlers can only be set there
        return run(args)
    previous = {number: signal.getsignal(number) for number in (signal.SIGXFSZ, signal.SIGTERM)}
    # A file-size limit (RLIMIT_FSIZE) then fails the write (EFBIG), reported, instead of killing the process.
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, stop_on_sigterm)  # the platform's stop: discard the case in progress, report, exit 143
    try:
        return run(args)
    finally:  # a caller (tests, a notebook) gets its own handlers back
        for number, handler in previous.items():
            signal.signal(number, handler)


def name_in_archive(text: object, *, unpacked: Path | None, archive: Path) -> str:
    """A path, or a message naming one, of a file unpacked from a .zip: named inside the archive (`scans.zip/study/...`),
    never by its temporary copy, which is gone when the run ends."""
    return str(text) if unpacked is None else str(text).replace(str(unpacked), str(archive))


def series_rule(args: argparse.Namespace, package: ModelPackage) -> SeriesRule:
    """How DICOM studies choose their series: the overrides, and the model's training spacing as the thickness to approach."""
    spacing = package.card.pixel_spacing_mm
    return SeriesRule(target_thickness_mm=sum(spacing) / len(spacing), series_uid=args.series_uid, description=args.series_description,
                      all_series=args.all_series)


def run(args: argparse.Namespace) -> int:
    """Every case of the run, results.json, and the exit code; a .zip input is unpacked for the run and removed after it."""
    with ExitStack() as resources:
        return run_cases(args, resources)


def run_cases(args: argparse.Namespace, resources: ExitStack) -> int:
    """Find the cases (the model first: its spacing chooses DICOM series), take this shard's, resume, run each, report."""
    shown = str  # until an archive is unpacked
    try:
        package = load_model_package(args.model or default_model())  # first: its training spacing chooses among DICOM series
        source = resources.enter_context(unpacked_archive(args.input)) if is_archive(args.input) else args.input
        shown = partial(name_in_archive, unpacked=source if source != args.input else None, archive=args.input)
        cases = find_cases(source, slug=args.input_slug, vertebrae_slug=args.vertebrae_slug, rule=series_rule(args, package))
        shard = choose_shard(args.shard, count=args.shard_count, environ=os.environ)
        if shard is not None and cases.layout == "grand-challenge":
            raise UsageError(f"shard {shard.label} ({shard.assigned_by}): Grand Challenge's layout is one case per job, it is not sharded")
        work = select_cases(cases.cases, shard)
        records = cases.layout == "folder"  # results/<case>.json; Grand Challenge's one case per job keeps its output as it was
        skip_existing = records and (args.skip_existing if args.skip_existing is not None else shard is not None)
        vertebrae = vertebrae_maps(args.vertebrae, cases.cases)
        grand_challenge = cases.layout == "grand-challenge"
        if grand_challenge and args.format not in ("auto", "mha"):
            log(f"--format {args.format} ignored: Grand Challenge's layout takes the mask as .mha")
        report = ReportOptions(vertebra_scheme=args.vertebra_labels, nifti=args.nifti, dicom_seg=not args.no_dicom_seg, dicom_seg_type=args.dicom_seg_type,
                               qc_path=args.qc_path if grand_challenge else None, mask_format="mha" if grand_challenge else args.format,
                               viewer_files=not grand_challenge)
        check_output_writable(args.output)
        budget = memory_budget(args.memory_limit_gb)
        done_before = find_complete_records(args.output, [c.case_id for c in work]) if skip_existing else {}
        if skip_existing:
            left = remove_partial_files(args.output)
            log(f"--skip-existing: {len(done_before)} of {len(work)} case(s) already complete in {args.output}"
                + (f"; removed {left} half-written file(s) of an earlier run" if left else ""))
        pending = [c for c in work if c.case_id not in done_before]
        next_of = {c.case_id: n for c, n in zip(pending, [*pending[1:], None])}
        progress = Progress(len(work), log=log)
        exit_code = 0
        with ReadAhead(budget=budget, read=read_ct) as reader, start_chosen_runtime(args.runtime, args.precision, package, threads=args.threads, log=log) as started:
            runtime, choice = started.runtime, started.choice
            log(f"model {package.card.identity} from {package.folder}; runtime {choice.name} ({choice.reason}); precision {started.precision.name} "
                f"({started.precision.reason}); {args.threads} thread(s) ({args.threads_origin}); {len(cases.cases)} case(s), {cases.layout} layout"
                + (f"; shard {shard.label} ({shard.assigned_by}) takes {len(work)} of them" if shard else ""))
            results = {"model": {"identity": package.card.identity, "folder": str(package.folder), "description": package.card.description},
                       "runtime": started.describe(), "output_slug": args.output_slug, "cases": []}
            if shard is not None:  # what postprocess/merge.py needs to join the shards
                results["shard"] = {"index": shard.index, "count": shard.count, "assigned_by": shard.assigned_by,
                                    "cases_in_run": [c.case_id for c in cases.cases]}
            for case in work:
                if case.case_id in done_before:
                    results["cases"].append(done_before[case.case_id])
                    progress.case_ended(case.case_id, seconds=0.0, outcome="skipped")
                    continue
                case_started = time.perf_counter()
                before = list_files(args.output)

                def on_hard_timeout(message: str, case: Case = case, before: set[Path] = before) -> None:
                    log(f"error: {shown(message)}")
                    remove_new_files(args.output, before)
                    results["cases"].append({"case_id": case.case_id, "status": "failed", "input": shown(case.source), "error": shown(message)})
                    write_json_atomically(args.output / "results.json", results)

                try:
                    if records:
                        forget_record(args.output, case.case_id)
                    with CaseTimer(args.time_limit_s, case=str(case.source), on_hard_timeout=on_hard_timeout):
                        entry = run_case(case, package=package, runtime=runtime, choice=choice, output_dir=args.output,
                                         slug=args.output_slug, batch_size=args.batch_size, reader=reader,
                                         next_case=next_of[case.case_id], report=report, vertebrae=vertebrae.get(case.case_id))
                    entry["input"] = shown(entry["input"])
                    if records:  # last: a record means every output of the case is in place (postprocess/records.py)
                        write_record(args.output, entry)
                    results["cases"].append(entry)  # only once the timer is disarmed: a late alarm discards the case whole
                    progress.case_ended(case.case_id, seconds=time.perf_counter() - case_started)
                except Exception as error:  # one case's failure, whatever it is, must not stop the others
                    remove_new_files(args.output, before)
                    message, code = describe_failure(error, case)
                    message = shown(message)
                    log(f"error: {message}")
                    results["cases"].append({"case_id": case.case_id, "status": "failed", "input": shown(case.source), "error": message})
                    exit_code = exit_code or code
                    progress.case_ended(case.case_id, seconds=time.perf_counter() - case_started, outcome="failed")
                    if isinstance(error, (OutputError, TerminatedError)):
                        break  # the output takes no more (every later case would fail the same way), or we were told to stop
            progress.close()
        try:
            write_json_atomically(args.output / "results.json", results)
        except OutputError as error:
            if exit_code != OutputError.exit_code:  # else the case's own line already said so
                log(f"error: {error}")
            return error.exit_code
        return exit_code
    except TrunkSegError as error:
        log(f"error: {shown(error)}")
        return error.exit_code
    except Exception as error:
        if os.environ.get("TRUNKSEG_DEBUG"):
            traceback.print_exc()
        log(f"error: unexpected {type(error).__name__}: {' '.join(str(error).split())[:300]} (set TRUNKSEG_DEBUG=1 for the traceback)")
        return 1


if __name__ == "__main__":
    raise SystemExit(main())
