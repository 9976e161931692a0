"""Join the output folders of a sharded run into one, as a single process would have written it.

    python -m postprocess.merge OUT/shard-0 OUT/shard-1 ... --output OUT/merged

Each shard folder holds a results.json whose "shard" entry says which shard it was and every case of the
run, in the run's order (process.py --shard; preprocess/shards.py). The merge checks that the folders
are the N shards of one run (same count, each index once, the same cases and model, each case in the
shard its id assigns it to), then writes to --output every succeeded case's files (its mask, measures
table, QC picture, DICOM-SEG, NIfTI, and its record results/<case>.json: hard links where the file
system allows, else copies) and one results.json with every case in the run's order. That folder equals
what one unsharded process would have written, except the cases' timings (and "runtime" when the
shards ran on different nodes: then each shard's is listed under "runtime_by_shard").

Exit codes: 0 merged (cases that had failed are listed on stderr with `warning:` and kept, with their
error, in results.json), 2 the folders are not the shards of one run or a shard is missing, 3 a shard's
results.json or a file it names is missing or unreadable (that shard has not finished: run it again,
it resumes), 5 the output cannot be written.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
from pathlib import Path

from common.atomic import atomic_path, write_json_atomically
from postprocess.records import RECORDS, list_output_paths
from common.errors import InputError, TrunkSegError, UsageError
from preprocess.shards import assign_shard


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def read_shard_results(folder: Path) -> dict:
    path = Path(folder) / "results.json"
    try:
        results = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise InputError(f"{path}: missing (has this shard finished? run it again: it resumes where it stopped)") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise InputError(f"{path}: cannot be read as JSON ({error})") from None
    if not isinstance(results, dict) or not isinstance(results.get("cases"), list):
        raise InputError(f"{path}: not a results.json of process.py (no list of cases)")
    if "shard" not in results:  # an unsharded run: the one shard of itself
        results["shard"] = {"index": 0, "count": 1, "cases_in_run": [c.get("case_id") for c in results["cases"]]}
    shard = results["shard"]
    if not isinstance(shard, dict) or not {"index", "count", "cases_in_run"} <= shard.keys():
        raise InputError(f"{path}: its 'shard' entry lacks index, count or cases_in_run")
    return results


def check_shards(runs: list[tuple[Path, dict]]) -> None:
    """The folders are the N shards of one run, each once, each holding exactly its own cases."""
    first_folder, first = runs[0]
    count, cases_in_run = first["shard"]["count"], first["shard"]["cases_in_run"]
    seen: dict[int, Path] = {}
    for folder, results in runs:
        shard = results["shard"]
        if shard["count"] != count:
            raise UsageError(f"{folder}: shard {shard['index']}/{shard['count']}, but {first_folder} is one of {count} shards")
        if shard["index"] in seen:
            raise UsageError(f"{folder} and {seen[shard['index']]} are both shard {shard['index']}/{count}")
        seen[shard["index"]] = folder
        if shard["cases_in_run"] != cases_in_run:
            raise UsageError(f"{folder}: its run saw other input cases than {first_folder}'s (did the input folder change between shards?)")
        for key in ("model", "output_slug"):
            if results.get(key) != first.get(key):
                raise UsageError(f"{folder}: {key} {results.get(key)!r} differs from {first_folder}'s {first.get(key)!r}")
        ids = [c.get("case_id") for c in results["cases"]]
        expected = [c for c in cases_in_run if assign_shard(c, count) == shard["index"]] if count > 1 else cases_in_run
        if ids != expected:
            missing, extra = sorted(set(expected) - set(ids)), sorted(set(ids) - set(expected))
            if missing and not extra and [c for c in expected if c in set(ids)] == ids:  # stopped early (SIGTERM, a full disk)
                raise InputError(f"{folder}: shard {shard['index']}/{count} has not finished: {len(missing)} of its {len(expected)} case(s) "
                                 f"are not in its results.json ({', '.join(missing[:5])}{', ...' if len(missing) > 5 else ''}): run it again, "
                                 f"it resumes")
            raise UsageError(f"{folder}: shard {shard['index']}/{count} should hold {len(expected)} case(s), holds {len(ids)}"
                             + (f"; missing {', '.join(missing[:5])}" if missing else "") + (f"; not its own {', '.join(extra[:5])}" if extra else ""))
    absent = sorted(set(range(count)) - set(seen))
    if absent:
        raise UsageError(f"shard(s) {', '.join(map(str, absent))} of {count} not given: a merge needs every shard of the run")


def place_file(source: Path, target: Path) -> None:
    """`target` becomes a copy of `source` (a hard link where possible), atomically."""
    if not source.is_file():
        raise InputError(f"{source}: named by its case's record but missing (run that shard again: it redoes the case)")
    with atomic_path(target) as temp:
        try:
            os.link(source, temp)
        except OSError:  # another file system, or links not allowed there
            shutil.copyfile(source, temp)


def merge_shards(folders: list[Path], output: Path) -> dict:
    """Write the merged output folder (module docstring); return its results.json."""
    output = Path(output)
    for folder in folders:
        if output.resolve() == Path(folder).resolve():
            raise UsageError(f"--output {output} is one of the shard folders: give a new folder")
    runs = [(Path(folder), read_shard_results(folder)) for folder in folders]
    check_shards(runs)
    by_case = {}
    for folder, results in runs:
        for case in results["cases"]:
            by_case[case["case_id"]] = (folder, case)
    first = runs[0][1]
    merged = {key: value for key, value in first.items() if key not in ("shard", "cases")}
    runtimes = {results["shard"]["index"]: results.get("runtime") for _, results in runs}
    if len({json.dumps(r, sort_keys=True) for r in runtimes.values()}) > 1:
        merged["runtime_by_shard"] = {str(index): runtimes[index] for index in sorted(runtimes)}
    merged["cases"] = []
    for case_id in first["shard"]["cases_in_run"]:
        folder, case = by_case[case_id]
        if case.get("status") == "succeeded":
            for relative in [*list_output_paths(case), f"{RECORDS}/{case_id}.json"]:
                place_file(folder / relative, output / relative)
        merged["cases"].append(case)
    write_json_atomically(output / "results.json", merged)
    return merged


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m postprocess.merge", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("shards", nargs="+", type=Path, help="the output folders of the shards (process.py --output of each)")
    parser.add_argument("--output", type=Path, required=True, help="the merged output folder (new, or an earlier merge of the same run)")
    args = parser.parse_args(argv)
    try:
        merged = merge_shards(args.shards, args.output)
    except TrunkSegError as error:
        log(f"error: {error}")
        return error.exit_code
    failed = [c for c in merged["cases"] if c.get("status") != "succeeded"]
    for case in failed:
        log(f"warning: case {case.get('case_id')} had failed: {case.get('error')}")
    log(f"merged {len(args.shards)} shard(s): {len(merged['cases']) - len(failed)} case(s) succeeded, {len(failed)} failed -> "
        f"{args.output / 'results.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
