"""Score one case (a worker's job) and all cases (in parallel, as Grand Challenge's templates do)."""

from __future__ import annotations

import multiprocessing
import os
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass

import numpy as np

from evaluation.cases import CaseInput
from evaluation.errors import CaseError, TrunkSegError
from evaluation.labels import LabelSet
from evaluation.levels import LevelTable, levels_from_table, levels_from_volume
from evaluation.metrics import CaseScores, score_case
from evaluation.volumes import read_annotated_slices, read_prediction_slices


@dataclass(frozen=True)
class Settings:
    label_set: LabelSet  # with its ignore value resolved
    tolerance_mm: float
    level_names: tuple[str, ...]  # empty: no level information
    level_table: LevelTable | None = None
    level_volumes: dict | None = None  # case_id -> vertebra label volume path
    read_strategy: str = "auto"


@dataclass(frozen=True)
class CaseResult:
    case: CaseInput
    status: str  # "scored" or "missing-prediction"
    annotation: str  # "ignore-value" or "foreground-slices"
    grid: str | None  # "same", "resampled"; None when the prediction is missing
    coverage: float
    slice_indices: np.ndarray
    z_mm: np.ndarray
    level_of_slice: np.ndarray  # index into Settings.level_names, -1 unknown
    pixel_spacing_mm: tuple[float, float]
    scores: CaseScores
    seconds: dict


def evaluate_case(case: CaseInput, settings: Settings) -> CaseResult:
    """Read one case's ground truth and prediction and score it. Raises CaseError naming the case."""
    started = time.perf_counter()
    try:
        truth = read_annotated_slices(case.truth_path, settings.label_set)
        read_truth = time.perf_counter()
        if case.prediction_path is None:
            prediction_codes, grid, coverage = np.zeros_like(truth.codes_syx), None, 0.0
        else:
            prediction = read_prediction_slices(case.prediction_path, truth, settings.label_set, case_id=case.case_id, strategy=settings.read_strategy)
            prediction_codes, grid, coverage = prediction.codes_syx, prediction.grid, prediction.coverage
        read_prediction = time.perf_counter()
        if settings.level_volumes and case.case_id in settings.level_volumes:
            level_of_slice = levels_from_volume(settings.level_volumes[case.case_id], case.case_id, truth, settings.level_names)
        elif settings.level_table is not None:
            level_of_slice = levels_from_table(settings.level_table, case.case_id, truth, settings.level_names)
        else:
            level_of_slice = np.full(truth.n_slices, -1, dtype=np.int64)
        scores = score_case(
            truth.codes_syx, prediction_codes, n_labels=len(settings.label_set.values), spacing_rc_mm=truth.pixel_spacing_mm,
            tolerance_mm=settings.tolerance_mm, level_of_slice=level_of_slice, n_levels=len(settings.level_names),
        )
    except CaseError:
        raise
    except TrunkSegError as error:
        raise CaseError(case.case_id, str(error)) from None
    done = time.perf_counter()
    return CaseResult(
        case=case,
        status="scored" if case.prediction_path is not None else "missing-prediction",
        annotation=truth.mode,
        grid=grid,
        coverage=coverage,
        slice_indices=truth.slice_indices,
        z_mm=truth.z_mm,
        level_of_slice=level_of_slice,
        pixel_spacing_mm=truth.pixel_spacing_mm,
        scores=scores,
        seconds={"read_truth": read_truth - started, "read_prediction": read_prediction - read_truth, "score": done - read_prediction},
    )


def default_workers() -> int:
    """CPU count, capped by GRAND_CHALLENGE_MAX_WORKERS when set (as the Grand Challenge templates do)."""
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    cap = os.environ.get("GRAND_CHALLENGE_MAX_WORKERS", "").strip()
    return max(1, min(cpus, int(cap))) if cap.isdigit() and int(cap) > 0 else cpus


def _single_threaded_worker() -> None:
    import SimpleITK as sitk

    sitk.ProcessObject.SetGlobalDefaultNumberOfThreads(1)


def evaluate_cases(cases, settings: Settings, *, workers: int, progress=None) -> tuple[list[CaseResult], list[CaseError]]:
    """Score every case; return the results (in case order) and the cases that failed."""
    results: dict[str, CaseResult] = {}
    failures: list[CaseError] = []

    def collect(case: CaseInput, outcome) -> None:
        if isinstance(outcome, CaseError):
            failures.append(outcome)
        else:
            results[case.case_id] = outcome
        if progress is not None:
            progress(case, outcome)

    if workers <= 1 or len(cases) <= 1:
        for case in cases:
            try:
                collect(case, evaluate_case(case, settings))
            except CaseError as error:
                collect(case, error)
    else:
        context = multiprocessing.get_context("spawn")  # ITK's thread pool does not survive fork
        with ProcessPoolExecutor(max_workers=min(workers, len(cases)), mp_context=context, initializer=_single_threaded_worker) as pool:
            futures = [(case, pool.submit(evaluate_case, case, settings)) for case in cases]
            for case, future in futures:
                try:
                    collect(case, future.result())
                except CaseError as error:
                    collect(case, error)
    ordered = [results[case.case_id] for case in cases if case.case_id in results]
    return ordered, sorted(failures, key=lambda e: e.case_id)
