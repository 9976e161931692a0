"""Shared by the sharding, Slurm and Kubernetes tests: eight small phantom cases, and "the same as one process"."""

from __future__ import annotations

import json
from pathlib import Path

import SimpleITK as sitk

from model.phantom import make_phantom

N_CASES = 8
#: case-05, case-06 -> shard 0 of 4; case-03 -> 1; case-00, case-04, case-07 -> 2; case-01, case-02 -> 3 (sha256 of the id, mod 4)
CASE_IDS = tuple(f"case-{i:02d}" for i in range(N_CASES))


def write_small_cases(folder: Path, *, n: int = N_CASES, n_slices: int = 4) -> list[str]:
    """`n` held-out phantoms of a few slices each, case-00.mha ...; their case ids."""
    ids = [f"case-{i:02d}" for i in range(n)]
    for i, case_id in enumerate(ids):
        phantom = make_phantom(880_000 + i, size_xy=(160, 128), spacing_mm=(2.0, 2.0, 5.0), n_slices=n_slices)
        folder.mkdir(parents=True, exist_ok=True)
        sitk.WriteImage(phantom.geometry.apply_to(sitk.GetImageFromArray(phantom.ct_zyx)), str(folder / f"{case_id}.mha"), useCompression=True)
    return ids


def comparable(record: dict) -> dict:
    """A results.json (or a case record) without what may differ between two runs of the same cases: timings, the shard."""
    out = {key: value for key, value in record.items() if key not in ("timings_s", "shard")}
    if "cases" in out:
        out["cases"] = [comparable(case) for case in out["cases"]]
    return out


def files_of(folder: Path) -> dict[str, Path]:
    return {str(p.relative_to(folder)): p for p in sorted(folder.rglob("*")) if p.is_file()}


def assert_same_as_one_process(merged: Path, single: Path) -> None:
    """The merged folder holds the same files as one process's, byte for byte, and the same records except timings."""
    got, want = files_of(merged), files_of(single)
    assert sorted(got) == sorted(want)
    for relative, path in want.items():
        if relative.endswith(".json"):
            assert comparable(json.loads(got[relative].read_text())) == comparable(json.loads(path.read_text())), relative
        else:
            assert got[relative].read_bytes() == path.read_bytes(), relative
