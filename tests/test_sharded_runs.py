"""process.py --shard, resuming (--skip-existing), progress lines, and postprocess.merge, end to end on 8 small phantoms."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

import process
from postprocess import merge
from tests.cluster_helpers import CASE_IDS, assert_same_as_one_process, comparable, files_of, write_small_cases
from tests.conftest import REPO

PROGRESS = re.compile(r"^\[(\d+)/(\d+)\] case (\S+) (done in \d+\.\d s|failed in \d+\.\d s|skipped \(already complete\)), "
                      r"(about \d+ (s|min) left|none left|\d+ left, no estimate yet)$")
SHARDS = {0: ["case-05", "case-06"], 1: ["case-03"], 2: ["case-00", "case-04", "case-07"], 3: ["case-01", "case-02"]}
ARGS = ["--threads", "1", "--runtime", "onnxruntime"]  # the same runtime and threads in every run compared here


def _main(*args, capsys=None) -> tuple[int, str]:
    code = process.main([str(a) for a in (*args, *ARGS)])
    return code, capsys.readouterr().err if capsys else ""


@pytest.fixture(scope="module")
def cases(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("cases") / "in"
    assert write_small_cases(folder) == list(CASE_IDS)
    return folder


@pytest.fixture(scope="module")
def single_run(cases) -> Path:
    out = cases.parent / "single"
    assert process.main(["--input", str(cases), "--output", str(out), *ARGS]) == 0
    return out


@pytest.fixture(scope="module")
def shard_runs(cases) -> list[Path]:
    outs = [cases.parent / f"shard-{i}" for i in range(4)]
    for i, out in enumerate(outs):
        assert process.main(["--input", str(cases), "--output", str(out), "--shard", f"{i}/4", *ARGS]) == 0
    return outs


def test_a_single_run_writes_one_record_per_case_equal_to_its_results_entry(single_run):
    results = json.loads((single_run / "results.json").read_text())
    assert [c["case_id"] for c in results["cases"]] == list(CASE_IDS)
    for case in results["cases"]:
        assert json.loads((single_run / "results" / f"{case['case_id']}.json").read_text()) == case


def test_each_shard_does_its_own_cases_only_and_says_which_shard_it_was(shard_runs):
    for index, out in enumerate(shard_runs):
        results = json.loads((out / "results.json").read_text())
        assert [c["case_id"] for c in results["cases"]] == SHARDS[index]
        assert results["shard"] == {"index": index, "count": 4, "assigned_by": "--shard", "cases_in_run": list(CASE_IDS)}
        assert sorted(p.stem for p in (out / "images" / "muscle-segmentation").iterdir()) == SHARDS[index]


def test_merging_the_shards_gives_what_one_process_writes(shard_runs, single_run, tmp_path, capsys):
    assert merge.main([*map(str, reversed(shard_runs)), "--output", str(tmp_path / "merged")]) == 0
    assert "8 case(s) succeeded, 0 failed" in capsys.readouterr().err
    assert_same_as_one_process(tmp_path / "merged", single_run)


def test_merge_refuses_an_incomplete_set_of_shards_naming_what_is_missing(shard_runs, tmp_path, capsys):
    assert merge.main([str(shard_runs[0]), str(shard_runs[2]), "--output", str(tmp_path / "m")]) == 2
    assert re.search(r"^error: shard\(s\) 1, 3 of 4 not given", capsys.readouterr().err, re.M)
    assert merge.main([str(shard_runs[0]), str(shard_runs[0]), "--output", str(tmp_path / "m")]) == 2
    assert "are both shard 0/4" in capsys.readouterr().err
    assert not (tmp_path / "m" / "results.json").exists()


def test_merge_of_an_unfinished_shard_says_to_run_it_again(shard_runs, tmp_path, capsys):
    unfinished = tmp_path / "shard-1"
    shutil.copytree(shard_runs[1], unfinished)
    (unfinished / "results.json").unlink()
    code = merge.main([str(shard_runs[0]), str(unfinished), str(shard_runs[2]), str(shard_runs[3]), "--output", str(tmp_path / "m")])
    assert code == 3
    assert re.search(rf"^error: {re.escape(str(unfinished / 'results.json'))}: missing .*run it again", capsys.readouterr().err, re.M)


def test_merge_of_a_shard_stopped_early_names_its_missing_cases(shard_runs, tmp_path, capsys):
    stopped = tmp_path / "shard-2"
    shutil.copytree(shard_runs[2], stopped)
    results = json.loads((stopped / "results.json").read_text())
    results["cases"] = results["cases"][:1]  # what a SIGTERM after the first case leaves
    (stopped / "results.json").write_text(json.dumps(results))
    code = merge.main([str(shard_runs[0]), str(shard_runs[1]), str(stopped), str(shard_runs[3]), "--output", str(tmp_path / "m")])
    assert code == 3
    assert "shard 2/4 has not finished: 2 of its 3 case(s) are not in its results.json (case-04, case-07)" in capsys.readouterr().err


def test_progress_lines_count_every_case_and_estimate_the_rest(cases, tmp_path, capsys):
    code, err = _main("--input", cases, "--output", tmp_path / "out", "--shard", "2/4", capsys=capsys)
    assert code == 0
    lines = [line for line in err.splitlines() if line.startswith("[")]
    parsed = [PROGRESS.match(line) for line in lines]
    assert all(parsed), lines
    assert [(int(m[1]), int(m[2]), m[3]) for m in parsed] == [(1, 3, "case-00"), (2, 3, "case-04"), (3, 3, "case-07")]
    assert "about" in lines[0] and lines[-1].endswith("none left")


def test_a_rerun_skips_complete_cases_and_redoes_half_written_ones(cases, single_run, tmp_path, capsys):
    out = tmp_path / "out"
    shutil.copytree(single_run, out)
    (out / "results" / "case-01.json").unlink()  # killed after its outputs were renamed, before its record: half-written
    (out / "measures" / "case-02.csv").unlink()  # a file its record names is gone: not complete
    junk = out / "images" / "muscle-segmentation" / ".partial-0a1b2c3d-case-03.mha"  # a killed run's temporary file
    junk.write_bytes(b"half")
    (out / "results.json").unlink()
    code, err = _main("--input", cases, "--output", out, "--skip-existing", capsys=capsys)
    assert code == 0
    assert "6 of 8 case(s) already complete" in err and "removed 1 half-written file(s)" in err
    done = sorted(m[3] for m in map(PROGRESS.match, err.splitlines()) if m and m[4].startswith("done"))
    assert done == ["case-01", "case-02"]
    assert not junk.exists()
    assert_same_as_one_process(out, single_run)


def test_a_shard_killed_mid_run_goes_on_where_it_stopped_when_restarted(cases, single_run, tmp_path):
    """SIGKILL (no chance to clean up) once two cases are recorded, then the same command again."""
    out = tmp_path / "out"
    command = [sys.executable, str(REPO / "process.py"), "--input", str(cases), "--output", str(out), "--skip-existing", *ARGS]
    proc = subprocess.Popen(command, stderr=subprocess.PIPE, text=True, cwd=REPO)
    deadline = time.monotonic() + 240
    while len(list((out / "results").glob("*.json"))) < 2 and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    os.kill(proc.pid, signal.SIGKILL)
    proc.communicate(timeout=30)
    recorded = sorted(p.stem for p in (out / "results").glob("*.json"))
    assert 2 <= len(recorded) < 8, "the run was to be killed mid-way"
    done = subprocess.run(command, stderr=subprocess.PIPE, text=True, cwd=REPO, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    skipped = sorted(m[3] for m in map(PROGRESS.match, done.stderr.splitlines()) if m and m[4].startswith("skipped"))
    assert skipped == recorded
    assert not [p for p in files_of(out) if ".partial-" in p]
    assert_same_as_one_process(out, single_run)


def test_a_failed_case_leaves_no_record_and_is_tried_again(cases, tmp_path, capsys):
    folder = tmp_path / "in"
    shutil.copytree(cases, folder)
    (folder / "case-03.mha").write_bytes(b"not an image")
    out = tmp_path / "out"
    code, _ = _main("--input", folder, "--output", out, "--shard", "1/4", capsys=capsys)
    assert code == 3
    assert not (out / "results").exists() or not list((out / "results").iterdir())
    assert comparable(json.loads((out / "results.json").read_text()))["cases"][0]["status"] == "failed"
    code, err = _main("--input", folder, "--output", out, "--shard", "1/4", capsys=capsys)
    assert code == 3 and "0 of 1 case(s) already complete" in err


def test_a_grand_challenge_layout_is_not_sharded(tmp_path, capsys, monkeypatch):
    slot = tmp_path / "in" / "images" / "ct"
    write_small_cases(slot, n=1)
    monkeypatch.setenv("JOB_COMPLETION_INDEX", "0")
    monkeypatch.setenv("TRUNKSEG_SHARD_COUNT", "2")
    code, err = _main("--input", tmp_path / "in", "--output", tmp_path / "out", capsys=capsys)
    assert code == 2 and "one case per job" in err


def test_on_a_terminal_a_tqdm_bar_counts_the_cases_beside_the_lines(cases, tmp_path):
    import fcntl
    import pty
    import struct
    import termios

    master, slave = pty.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 40, 120, 0, 0))  # a new pty is 0 columns wide: tqdm would draw nothing
    proc = subprocess.Popen([sys.executable, str(REPO / "process.py"), "--input", str(cases), "--output", str(tmp_path / "out"),
                             "--shard", "1/4", *ARGS], stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=slave, cwd=REPO)
    os.close(slave)
    chunks = []
    while True:
        try:
            chunk = os.read(master, 65536)
        except OSError:  # EIO: the process closed the terminal
            break
        if not chunk:
            break
        chunks.append(chunk)
    os.close(master)
    assert proc.wait(timeout=300) == 0
    text = b"".join(chunks).decode(errors="replace")
    assert re.search(r"cases: 100%\|.*\| 1/1", text), text[-2000:]
    assert "[1/1] case case-03 done in" in text
