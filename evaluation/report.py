"""What a person and the leaderboard read: metrics.json, a per-slice CSV and a PNG figure.

Everything is rendered in memory first, then each file is written atomically (temp file + os.replace),
metrics.json last: a failed run leaves no metrics.json of its own. NaN ("not scored") becomes null
or is left out; json.dumps(allow_nan=False) guarantees that no NaN or Infinity reaches the file.
"""

from __future__ import annotations

import csv
import io
import json
import math
from pathlib import Path

import numpy as np

from evaluation import __version__
from common.atomic import write_bytes_atomically
from evaluation.evaluate import CaseResult, Settings
from evaluation.metrics import HD_PERCENT

METRICS_FILE = "metrics.json"
SLICES_FILE = "metrics_per_slice.csv"
FIGURE_FILE = "metrics.png"
METRIC_NAMES = ("dice", "hd95_mm", "nsd")
CSV_COLUMNS = (
    "case_id", "slice_index", "z_mm", "level", "muscle", "label", "dice", "hd95_mm", "nsd",
    "truth_area_cm2", "prediction_area_cm2", "truth_px", "prediction_px", "overlap_px",
)


def policy_text(settings: Settings) -> dict:
    return {
        "annotated_voxels": (
            f"a voxel is scored only if annotated: when the ground truth holds the ignore value {settings.label_set.ignore} anywhere, "
            "every other voxel is annotated; otherwise every axial slice holding any foreground label is annotated (all its voxels) "
            "and all other slices are not"
        ),
        "absent_in_both": (
            "a muscle absent from both ground truth and prediction on the annotated voxels of a case (or slice, or level) is not "
            "scored there: it has no entry, is left out of the case's means, and the aggregates' n counts only the cases that scored it"
        ),
        "absent_in_one": (
            "a muscle present in one of ground truth and prediction but not the other scores Dice 0 and NSD 0, and its HD95 is the "
            "worst possible value, the in-plane diagonal of the ground-truth slice in mm"
        ),
        "missing_prediction": "an error unless --allow-missing; with it the case is scored against an empty prediction (status 'missing-prediction')",
        "grid": "the prediction is compared on the ground truth's grid; on another grid it is resampled there (nearest neighbour), field-of-view coverage reported",
    }


def definitions(settings: Settings) -> dict:
    return {
        "dice": "2|T∩P| / (|T|+|P|) over the annotated voxels of the case (slices pooled); per slice over that slice's annotated voxels",
        "hd95_mm": (
            f"{HD_PERCENT:g}th-percentile Hausdorff distance in mm: contour points on pixel corners weighted by contour length "
            "(Nikolov et al. 2021, as DeepMind's surface-distance computes it in 2D), distances measured within each annotated "
            "slice with its true pixel spacing; the larger of the two directed percentiles; per case, the contour points of all "
            "annotated slices pooled"
        ),
        "nsd": (
            f"normalised surface Dice at a tolerance of {settings.tolerance_mm:g} mm: contour length of each mask within the "
            "tolerance of the other's contour, over the total contour length of both; same contours and pooling as hd95_mm"
        ),
        "area_cm2": "muscle cross-sectional area on an annotated slice (pixels x true pixel area); per case, the mean over the slices where the muscle is scored",
        "aggregates": (
            "per muscle: statistics over cases of the per-case value; overall: statistics over cases of each case's mean over its "
            "scored muscles (macro); pooled_dice: 2 sum|T∩P| / sum(|T|+|P|) over all cases (per muscle) and also all muscles (overall); "
            "by_level: the same over the slices of each vertebral level (per-muscle statistics for Dice only). "
            "std is the population standard deviation; p05/p95 interpolate linearly"
        ),
    }


def _number(value, digits: int = 6):
    """A JSON-safe float: NaN and infinities become None."""
    value = float(value)
    return round(value, digits) if math.isfinite(value) else None


def describe(values) -> dict:
    """mean, std, median, p05, p95 and n of the finite values (all None when there are none)."""
    array = np.asarray([v for v in values if v is not None and math.isfinite(v)], dtype=np.float64)
    if array.size == 0:
        return {"mean": None, "std": None, "median": None, "p05": None, "p95": None, "n": 0}
    p05, median, p95 = np.percentile(array, [5, 50, 95])
    return {"mean": _number(array.mean()), "std": _number(array.std()), "median": _number(median), "p05": _number(p05), "p95": _number(p95), "n": int(array.size)}


def _nanmean(values: np.ndarray):
    values = values[np.isfinite(values)]
    return _number(values.mean()) if values.size else None


def _case_entry(result: CaseResult, settings: Settings) -> dict:
    names = settings.label_set.names
    case_scores, slice_scores = result.scores.per_case, result.scores.per_slice
    scored_slices = np.isfinite(slice_scores.dice)  # (S, K)
    muscles, not_scored = {}, []
    for k, name in enumerate(names):
        if not np.isfinite(case_scores.dice[0, k]):
            not_scored.append(name)
            continue
        n = int(scored_slices[:, k].sum())
        muscles[name] = {
            "dice": _number(case_scores.dice[0, k]),
            "hd95_mm": _number(case_scores.hd95_mm[0, k]),
            "nsd": _number(case_scores.nsd[0, k]),
            "truth_area_cm2": _number(case_scores.truth_area_cm2[0, k] / n),
            "prediction_area_cm2": _number(case_scores.prediction_area_cm2[0, k] / n),
            "truth_px": int(case_scores.truth_px[0, k]),
            "prediction_px": int(case_scores.prediction_px[0, k]),
            "overlap_px": int(case_scores.overlap_px[0, k]),
            "n_slices": n,
        }
    level_names = settings.level_names
    slices = []
    for s, index in enumerate(result.slice_indices):
        level = int(result.level_of_slice[s])
        slices.append({
            "slice_index": int(index),
            "z_mm": _number(result.z_mm[s], 3),
            "level": level_names[level] if level >= 0 else None,
            "dice_mean": _nanmean(slice_scores.dice[s]),
            "n_muscles": int(scored_slices[s].sum()),
        })
    entry = {
        "case_id": result.case.case_id,
        "status": result.status,
        "ground_truth": str(result.case.truth_path),
        "prediction": str(result.case.prediction_path) if result.case.prediction_path else None,
        "job_pk": result.case.job_pk,
        "image_name": result.case.image_name,
        "annotation": result.annotation,
        "grid": result.grid,
        "field_of_view_coverage": _number(result.coverage),
        "pixel_spacing_mm": [_number(v) for v in result.pixel_spacing_mm],
        "n_annotated_slices": int(result.slice_indices.size),
        "mean": {metric: _nanmean(getattr(case_scores, metric)[0]) for metric in METRIC_NAMES},
        "n_muscles_scored": len(muscles),
        "muscles": muscles,
        "not_scored": not_scored,
        "slices": slices,
    }
    if level_names:
        level_scores = result.scores.per_level
        entry["levels"] = {
            level_names[index]: {
                "n_slices": int(level_scores.n_slices[index]),
                "n_muscles": int(np.isfinite(level_scores.dice[index]).sum()),
                **{f"{metric}_mean": _nanmean(getattr(level_scores, metric)[index]) for metric in METRIC_NAMES},
            }
            for index in range(len(level_names))
            if level_scores.n_slices[index] > 0
        }
    return entry


def _pooled(overlap: np.ndarray, truth: np.ndarray, prediction: np.ndarray):
    total = float(truth.sum() + prediction.sum())
    return _number(2.0 * float(overlap.sum()) / total) if total > 0 else None


def _aggregate_block(per_case: list, settings: Settings, *, per_muscle: tuple[str, ...] = METRIC_NAMES) -> dict:
    """Aggregates over a list of per-group Scores rows, each item (Scores, row index); per-muscle statistics for `per_muscle`."""
    names = settings.label_set.names
    block = {}
    for metric in METRIC_NAMES:
        table = np.array([getattr(scores, metric)[row] for scores, row in per_case]).reshape(len(per_case), len(names))
        case_means = [np.nanmean(r) if np.isfinite(r).any() else math.nan for r in table]
        block[metric] = {"overall": describe(case_means)}
        if metric in per_muscle:
            block[metric]["per_muscle"] = {name: describe(table[:, k]) for k, name in enumerate(names)}
    overlap = np.array([scores.overlap_px[row] for scores, row in per_case]).reshape(len(per_case), len(names))
    truth = np.array([scores.truth_px[row] for scores, row in per_case]).reshape(len(per_case), len(names))
    prediction = np.array([scores.prediction_px[row] for scores, row in per_case]).reshape(len(per_case), len(names))
    block["pooled_dice"] = {
        "overall": _pooled(overlap, truth, prediction),
        "per_muscle": {name: _pooled(overlap[:, k], truth[:, k], prediction[:, k]) for k, name in enumerate(names)},
    }
    return block


def build_metrics(results: list[CaseResult], settings: Settings, *, run_info: dict) -> dict:
    """The metrics.json document: {"results": [...], "aggregates": {...}, plus policy, definitions, config}."""
    aggregates = {
        "n_cases": len(results),
        "n_cases_missing_prediction": sum(r.status == "missing-prediction" for r in results),
        **_aggregate_block([(r.scores.per_case, 0) for r in results], settings),
    }
    if settings.level_names:
        by_level = {}
        for index, level in enumerate(settings.level_names):
            rows = [(r.scores.per_level, index) for r in results if r.scores.per_level.n_slices[index] > 0]
            if rows:
                by_level[level] = {"n_cases": len(rows), **_aggregate_block(rows, settings, per_muscle=("dice",))}
        aggregates["by_level"] = by_level
    return {
        "results": [_case_entry(r, settings) for r in results],
        "aggregates": aggregates,
        "policy": policy_text(settings),
        "definitions": definitions(settings),
        "config": {
            "evaluation_version": __version__,
            "labels": {"source": settings.label_set.source, "ignore": settings.label_set.ignore, "names": dict(zip(settings.label_set.names, settings.label_set.values, strict=True))},
            "tolerance_mm": settings.tolerance_mm,
            "hd_percentile": HD_PERCENT,
            "levels": list(settings.level_names),
            **run_info,
        },
    }


def _cell(value, digits: int):
    number = _number(value, digits)
    return "" if number is None else number


def render_slices_csv(results: list[CaseResult], settings: Settings) -> str:
    """One row per (case, annotated slice, muscle scored there)."""
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(CSV_COLUMNS)
    names, values = settings.label_set.names, settings.label_set.values
    for result in results:
        scores = result.scores.per_slice
        for s, k in zip(*np.nonzero(np.isfinite(scores.dice)), strict=True):
            level = int(result.level_of_slice[s])
            writer.writerow([
                result.case.case_id, int(result.slice_indices[s]), _number(result.z_mm[s], 3),
                settings.level_names[level] if level >= 0 else "", names[k], values[k],
                *(_cell(array[s, k], digits) for array, digits in (
                    (scores.dice, 6), (scores.hd95_mm, 6), (scores.nsd, 6), (scores.truth_area_cm2, 4), (scores.prediction_area_cm2, 4))),
                int(scores.truth_px[s, k]), int(scores.prediction_px[s, k]), int(scores.overlap_px[s, k]),
            ])
    return buffer.getvalue()


def render_figure(results: list[CaseResult], settings: Settings) -> bytes:
    """PNG: per-muscle Dice box plot; Dice by vertebral level (or by annotated slice, cranial to caudal)."""
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib.figure import Figure

    names = settings.label_set.names
    figure = Figure(figsize=(13, 9), dpi=100, layout="constrained")
    top, bottom = figure.subplots(2, 1)
    per_muscle = [np.array([r.scores.per_case.dice[0, k] for r in results]) for k in range(len(names))]
    per_muscle = [v[np.isfinite(v)] for v in per_muscle]
    _boxes(top, per_muscle, names, rotate=True)
    top.set_ylabel("Dice per case")
    top.set_title(f"Dice per muscle ({len(results)} cases; annotated slices only)")
    if settings.level_names:
        groups = settings.level_names
        data = [np.concatenate([r.scores.per_level.dice[index] for r in results]) for index in range(len(groups))]
        bottom.set_xlabel("vertebral level (cranial to caudal)")
        bottom.set_title("Dice by vertebral level (each point: one muscle in one case)")
    else:
        n_ranks = max((r.slice_indices.size for r in results), default=0)
        data = [[] for _ in range(n_ranks)]
        for r in results:
            for rank, s in enumerate(np.argsort(-r.z_mm)):  # cranial (largest z) first
                data[rank].append(r.scores.per_slice.dice[s])
        data = [np.asarray(d, dtype=np.float64) for d in data]
        groups = [str(i + 1) for i in range(n_ranks)]
        bottom.set_xlabel("annotated slice, cranial to caudal (no level information given)")
        bottom.set_title("Dice by annotated slice (each point: one muscle in one case)")
    data = [d[np.isfinite(d)] for d in data]
    _boxes(bottom, data, groups, rotate=False)
    bottom.set_ylabel("Dice")
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png")
    return buffer.getvalue()


def _boxes(axes, data, labels, *, rotate: bool) -> None:
    positions = np.arange(1, len(labels) + 1)
    filled = [i for i, d in enumerate(data) if len(d)]
    if filled:
        axes.boxplot([data[i] for i in filled], positions=positions[filled], widths=0.6, showmeans=True, flierprops={"markersize": 3})
    axes.set_xticks(positions, labels, rotation=60 if rotate else 0, ha="right" if rotate else "center", fontsize=8 if rotate else 9)
    axes.set_xlim(0.4, len(labels) + 0.6)
    axes.set_ylim(-0.03, 1.03)
    axes.grid(axis="y", alpha=0.3)
    for i, d in enumerate(data):
        if not len(d):
            axes.text(positions[i], 0.5, "n/a", ha="center", va="center", fontsize=7, color="grey")


def render_metrics_json(metrics: dict) -> str:
    try:
        return json.dumps(metrics, indent=1, allow_nan=False, ensure_ascii=False) + "\n"
    except ValueError as error:  # a NaN slipped through: a bug, never a file
        raise RuntimeError(f"metrics hold a non-finite number: {error}") from None


def write_outputs(output_dir: Path, *, metrics: dict, slices_csv: str, figure_png: bytes | None) -> list[Path]:
    """Write the CSV and the figure, then metrics.json last; return the paths written."""
    output_dir = Path(output_dir)
    metrics_text = render_metrics_json(metrics)
    written = []
    write_bytes_atomically(output_dir / SLICES_FILE, slices_csv.encode("utf-8"))
    written.append(output_dir / SLICES_FILE)
    if figure_png is not None:
        write_bytes_atomically(output_dir / FIGURE_FILE, figure_png)
        written.append(output_dir / FIGURE_FILE)
    write_bytes_atomically(output_dir / METRICS_FILE, metrics_text.encode("utf-8"))
    written.append(output_dir / METRICS_FILE)
    return written
