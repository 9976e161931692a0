"""The paper's results table: Dice per muscle and per vertebral level, beside the published means.

    python -m evaluation --predictions DIR --ground-truth DIR --output DIR --published paper.csv

writes `paper_table.md` (for a person) and `paper_table.csv` (one row per figure) beside metrics.json.
Each figure is a mean and a sample standard deviation (n - 1) over cases of a per-case Dice, on the
annotated voxels only; a muscle absent from both ground truth and prediction in a case is not scored
there and not counted in n (nnU-Net's NaN, left out by its nanmean alike).

Rows:
- one per label (a muscle on one side), and for a muscle with a right and a left label one for both
  sides, where each case contributes the mean of the sides it scored;
- one per vertebral level: each case's mean over the muscles scored at that level (mean of case
  means), and nnU-Net's `foreground_mean` for the level (each muscle's mean over cases, then the mean
  over muscles);
- overall: the mean of case means (each case: the mean over its scored muscles), nnU-Net's
  `foreground_mean` (each muscle: the mean over the cases that scored it; then the mean over the
  muscles scored anywhere), and the pooled Dice 2 sum|T n P| / sum(|T| + |P|).

Published figures come from a CSV the user writes from the paper, header `name,dice` (optional `sd`):
`name` is a label (`erector_spinae_right`), a muscle without side (`erector_spinae`: the both-sides
row), a level (`T12`), `overall` (compared with the mean of case means) or `foreground_mean`. Names
are matched after lower-casing and turning spaces and hyphens into underscores; Dice is a fraction in
0..1 (a value above 1 is refused, not guessed to be a percentage).
"""

from __future__ import annotations

import csv
import io
import math
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from evaluation.errors import ConfigError
from evaluation.evaluate import CaseResult, Settings
from common.labels import LEVELS

TABLE_MARKDOWN = "paper_table.md"
TABLE_CSV = "paper_table.csv"
OVERALL = "overall"
FOREGROUND_MEAN = "foreground_mean"
SIDES = ("right", "left")
CSV_COLUMNS = ("section", "name", "side", "aggregation", "n", "mean", "sd", "published", "published_sd", "difference")

CONTOUR_MODEL_NOTE = (
    "HD95 and NSD (in metrics.json) use the contour model of Nikolov et al. 2021 as DeepMind's surface-distance "
    "computes it: contour points on pixel corners, each weighted by the contour length through it, distances within "
    "each annotated slice in mm. Tools that take the boundary voxels as the surface and measure between voxel centres "
    "without weights (MedPy's hd95, for one) give different values for the same masks: compare HD95 and NSD across "
    "papers only when they were computed the same way."
)


@dataclass(frozen=True)
class Published:
    """Published figures by normalised name: (mean Dice, SD or None)."""

    figures: dict
    source: str


@dataclass(frozen=True)
class Figure:
    """One row of the table: our mean and SD over n cases, the published figure and the difference."""

    section: str  # "muscle", "level" or "overall"
    name: str
    side: str  # "right", "left", "both" or ""
    aggregation: str
    n: int
    mean: float | None
    sd: float | None  # sample SD (n - 1); None when n < 2
    published: float | None
    published_sd: float | None

    @property
    def difference(self) -> float | None:
        return None if self.mean is None or self.published is None else self.mean - self.published


@dataclass(frozen=True)
class CappedHd95:
    """How many HD95 values are (or include) the worst value, the slice diagonal."""

    slice_values: int  # (case, annotated slice, muscle) values scored
    slice_capped: int  # of them, the muscle in one mask only on that slice: HD95 = the slice diagonal
    case_values: int  # (case, muscle) values scored
    case_touched: int  # of them, pooling at least one such slice
    case_capped: int  # of them, equal to the diagonal


def normalise_name(name: str) -> str:
    return re.sub(r"[\s\-]+", "_", name.strip().lower())


def muscles_with_sides(names: tuple[str, ...]) -> dict[str, tuple[str, str]]:
    """{muscle: (right label, left label)} for every muscle that has both a _right and a _left label, in label order."""
    pairs = {}
    for name in names:
        if name.endswith("_right") and f"{name[:-6]}_left" in names:
            pairs[name[:-6]] = (name, f"{name[:-6]}_left")
    return pairs


def allowed_names(settings: Settings) -> set[str]:
    names = settings.label_set.names
    levels = {normalise_name(level) for level in (*LEVELS, *settings.level_names)}
    return {*(normalise_name(n) for n in names), *(normalise_name(m) for m in muscles_with_sides(names)), *levels, OVERALL, FOREGROUND_MEAN}


def _fraction(text: str, *, path: Path, line: int, column: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise ConfigError(f"{path}: line {line}: {column} {text!r} is not a number") from None
    if not math.isfinite(value) or not 0.0 <= value <= 1.0:
        hint = " (give Dice as a fraction, 0.91 not 91)" if math.isfinite(value) and 1.0 < value <= 100.0 else ""
        raise ConfigError(f"{path}: line {line}: {column} {text!r} is outside 0..1{hint}")
    return value


def load_published(path: Path, settings: Settings) -> Published:
    """Read the published figures (see the module docstring); every name must be one the table has."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8-sig")
    except FileNotFoundError:
        raise ConfigError(f"{path}: published figures file not found") from None
    except (OSError, UnicodeDecodeError) as error:
        raise ConfigError(f"{path}: cannot read published figures ({error})") from None
    reader = csv.DictReader(text.splitlines())
    header = [normalise_name(h) for h in (reader.fieldnames or [])]
    if "name" not in header or "dice" not in header:
        raise ConfigError(f"{path}: expected a CSV with the header name,dice (optionally sd), got {reader.fieldnames}")
    reader.fieldnames = header
    known = allowed_names(settings)
    figures: dict[str, tuple[float, float | None]] = {}
    for line, row in enumerate(reader, start=2):
        name = normalise_name(row.get("name") or "")
        if not name:
            raise ConfigError(f"{path}: line {line}: empty name")
        if name not in known:
            raise ConfigError(
                f"{path}: line {line}: {row['name']!r} is not a label, a muscle without side, a level, "
                f"'{OVERALL}' or '{FOREGROUND_MEAN}' of this evaluation (labels from {settings.label_set.source})"
            )
        if name in figures:
            raise ConfigError(f"{path}: line {line}: {name} is given twice")
        sd_text = (row.get("sd") or "").strip()
        figures[name] = (
            _fraction((row.get("dice") or "").strip(), path=path, line=line, column="dice"),
            _fraction(sd_text, path=path, line=line, column="sd") if sd_text else None,
        )
    if not figures:
        raise ConfigError(f"{path}: no published figures (one row per name after the header name,dice)")
    return Published(figures=figures, source=str(path))


def _stats(values) -> tuple[int, float | None, float | None]:
    array = np.asarray([v for v in values if v is not None and math.isfinite(v)], dtype=np.float64)
    if array.size == 0:
        return 0, None, None
    return int(array.size), float(array.mean()), (float(array.std(ddof=1)) if array.size > 1 else None)


def _row_mean(values: np.ndarray) -> float:
    scored = values[np.isfinite(values)]
    return float(scored.mean()) if scored.size else math.nan


def _foreground_mean(table: np.ndarray) -> tuple[int, float | None]:
    """nnU-Net's foreground_mean of a (cases, labels) table: each label's mean over cases, then the mean over labels."""
    label_means = [_row_mean(table[:, k]) for k in range(table.shape[1])]
    scored = [m for m in label_means if math.isfinite(m)]
    return len(scored), (float(np.mean(scored)) if scored else None)


def build_figures(results: list[CaseResult], settings: Settings, published: Published | None) -> list[Figure]:
    names = settings.label_set.names
    given = published.figures if published is not None else {}

    def figure(section: str, name: str, side: str, aggregation: str, stats: tuple, key: str) -> Figure:
        n, mean, sd = stats
        value, value_sd = given.get(key, (None, None))
        return Figure(section, name, side, aggregation, n, mean, sd, value, value_sd)

    per_case = np.array([r.scores.per_case.dice[0] for r in results], dtype=np.float64).reshape(len(results), len(names))
    rows: list[Figure] = []
    pairs = muscles_with_sides(names)
    paired = {label for pair in pairs.values() for label in pair}
    for muscle, (right, left) in pairs.items():
        for side, label in zip(SIDES, (right, left), strict=True):
            rows.append(figure("muscle", muscle, side, "mean over cases", _stats(per_case[:, names.index(label)]), normalise_name(label)))
        both = per_case[:, [names.index(right), names.index(left)]]
        rows.append(figure("muscle", muscle, "both", "mean over cases of each case's mean over its scored sides",
                           _stats(_row_mean(row) for row in both), normalise_name(muscle)))
    for k, name in enumerate(names):
        if name not in paired:
            rows.append(figure("muscle", name, "", "mean over cases", _stats(per_case[:, k]), normalise_name(name)))
    for index, level in enumerate(settings.level_names):
        cases = [r for r in results if r.scores.per_level.n_slices[index] > 0]
        table = np.array([r.scores.per_level.dice[index] for r in cases], dtype=np.float64).reshape(len(cases), len(names))
        rows.append(figure("level", level, "", "mean of case means", _stats(_row_mean(row) for row in table), normalise_name(level)))
        n_labels, foreground = _foreground_mean(table)
        rows.append(Figure("level", level, "", f"nnU-Net foreground_mean (over {n_labels} muscles)", n_labels, foreground, None, None, None))
    rows.append(figure("overall", "all muscles", "", "mean of case means", _stats(_row_mean(row) for row in per_case), OVERALL))
    n_labels, foreground = _foreground_mean(per_case)
    value, value_sd = given.get(FOREGROUND_MEAN, (None, None))
    rows.append(Figure("overall", "all muscles", "", f"nnU-Net foreground_mean (over {n_labels} muscles)", n_labels, foreground, None, value, value_sd))
    overlap = sum(float(r.scores.per_case.overlap_px[0].sum()) for r in results)
    total = sum(float(r.scores.per_case.truth_px[0].sum() + r.scores.per_case.prediction_px[0].sum()) for r in results)
    rows.append(Figure("overall", "all muscles", "", "pooled Dice over all cases and muscles", len(results),
                       2.0 * overlap / total if total > 0 else None, None, None, None))
    return rows


def count_capped_hd95(results: list[CaseResult]) -> CappedHd95:
    """HD95 values that are the slice diagonal: a muscle in one of ground truth and prediction but not the other on a slice."""
    slice_values = slice_capped = case_values = case_touched = case_capped = 0
    for result in results:
        per_slice, per_case = result.scores.per_slice, result.scores.per_case
        scored = np.isfinite(per_slice.hd95_mm)
        one_sided = scored & ((per_slice.truth_px == 0) != (per_slice.prediction_px == 0))
        slice_values += int(scored.sum())
        slice_capped += int(one_sided.sum())
        case_scored = np.isfinite(per_case.hd95_mm[0])
        case_values += int(case_scored.sum())
        case_touched += int((case_scored & one_sided.any(axis=0)).sum())
        case_capped += int((case_scored & (per_case.hd95_mm[0] >= result.scores.worst_hd_mm * (1 - 1e-9))).sum())
    return CappedHd95(slice_values, slice_capped, case_values, case_touched, case_capped)


def _format(value: float | None, *, signed: bool = False) -> str:
    if value is None:
        return ""
    return f"{value:+.3f}" if signed else f"{value:.3f}"


def render_csv(figures: list[Figure]) -> str:
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(CSV_COLUMNS)
    for f in figures:
        writer.writerow([f.section, f.name, f.side, f.aggregation, f.n, *(
            "" if v is None else round(v, 6) for v in (f.mean, f.sd, f.published, f.published_sd, f.difference))])
    return buffer.getvalue()


def _published_cell(f: Figure) -> str:
    if f.published is None:
        return ""
    return _format(f.published) + (f" ± {f.published_sd:.3f}" if f.published_sd is not None else "")


def render_markdown(figures: list[Figure], results: list[CaseResult], settings: Settings, published: Published | None) -> str:
    capped = count_capped_hd95(results)
    missing = sum(r.status == "missing-prediction" for r in results)
    lines = [
        "# Dice in the paper's table layout",
        "",
        f"{len(results)} case(s)" + (f", {missing} of them without a prediction (scored as empty)" if missing else "")
        + f"; labels from {settings.label_set.source}; Dice on the annotated voxels only. "
        + (f"Published figures: {published.source}." if published else "No published figures given (--published CSV)."),
        "Mean and SD are over cases: SD is the sample standard deviation (n - 1), blank for fewer than 2 cases "
        "(metrics.json's `std` is the population SD). n counts the cases that scored the muscle: a muscle absent "
        "from both ground truth and prediction in a case is left out there, as nnU-Net leaves out its NaN. "
        "Difference: ours minus published.",
        "",
        "## Per muscle",
        "",
        "| muscle | side | n | mean | SD | published | difference |",
        "|---|---|---:|---:|---:|---:|---:|",
    ]
    previous = None
    for f in (f for f in figures if f.section == "muscle"):
        name = f.name.replace("_", " ") if f.name != previous else ""
        previous = f.name
        lines.append(f"| {name} | {f.side} | {f.n} | {_format(f.mean)} | {_format(f.sd)} | {_published_cell(f)} | {_format(f.difference, signed=True)} |")
    level_rows = [f for f in figures if f.section == "level"]
    lines += ["", "## Per vertebral level", ""]
    if level_rows:
        lines += [
            "Mean of case means: each case's mean over the muscles scored at that level, then the mean and SD over the cases "
            "with slices at that level. nnU-Net's foreground_mean: each muscle's mean over those cases, then the mean over muscles.",
            "",
            "| level | cases | mean of case means | SD | nnU-Net foreground_mean | published | difference |",
            "|---|---:|---:|---:|---:|---:|---:|",
        ]
        for mean_row, foreground_row in zip(level_rows[::2], level_rows[1::2], strict=True):
            lines.append(f"| {mean_row.name} | {mean_row.n} | {_format(mean_row.mean)} | {_format(mean_row.sd)} | "
                         f"{_format(foreground_row.mean)} | {_published_cell(mean_row)} | {_format(mean_row.difference, signed=True)} |")
    else:
        lines.append("No level information (give a levels file or vertebra label volumes with the ground truth).")
    lines += [
        "",
        "## All muscles",
        "",
        "| aggregation | n | value | SD | published | difference |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for f in (f for f in figures if f.section == "overall"):
        lines.append(f"| {f.aggregation} | {f.n} | {_format(f.mean)} | {_format(f.sd)} | {_published_cell(f)} | {_format(f.difference, signed=True)} |")
    lines += [
        "",
        "n: cases for the mean of case means and the pooled Dice, muscles for the foreground_mean. The mean of case means "
        "weighs every case alike; nnU-Net's foreground_mean (its summary.json) weighs every muscle alike, so muscles "
        "missing from many cases count as much as the others; the pooled Dice weighs every voxel alike, so large muscles "
        "dominate. Say which one a comparison uses.",
        "",
        "## HD95: values at the cap",
        "",
        f"A muscle present in one of ground truth and prediction but not the other on an annotated slice gets the worst "
        f"value there, the slice's in-plane diagonal (mm). {capped.slice_capped} of {capped.slice_values} per-slice HD95 "
        f"values (case, slice, muscle) are that cap; {capped.case_touched} of {capped.case_values} per-case HD95 values "
        f"pool at least one such slice, and {capped.case_capped} of them equal the diagonal. Means of HD95 are pulled up "
        "by them: compare medians, or the values without the capped ones, with care.",
        "",
        "## How HD95 and NSD are computed",
        "",
        CONTOUR_MODEL_NOTE + f" NSD tolerance: {settings.tolerance_mm:g} mm.",
        "",
    ]
    return "\n".join(lines)


def render_paper_table(results: list[CaseResult], settings: Settings, published: Published | None) -> dict[str, bytes]:
    """{file name: content} of the two table files."""
    figures = build_figures(results, settings, published)
    return {
        TABLE_MARKDOWN: render_markdown(figures, results, settings, published).encode("utf-8"),
        TABLE_CSV: render_csv(figures).encode("utf-8"),
    }
