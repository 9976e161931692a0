"""Throughput of one process against 2 and 4 shards on this machine, and the cost of resuming a killed run.

    python benchmarks/bench_shards.py [--cases 16] [--slices 69]

The input is --cases copies of the bundled demo CT (samples/demo/ct, 240 x 200 x 69 at 1.6 x 1.6 x 5 mm;
--slices keeps only its first slices). Every row runs process.py as separate processes, as a scheduler
would: "1 process" with --threads = all CPUs; "N shards" starts N processes at once (--shard i/N), each
with --threads max(1, CPUs / N), like a Slurm array with --cpus-per-task = CPUs / N on one node. Peak
memory is each process's maximum resident set (wait4's ru_maxrss). "resume" kills (SIGKILL) one process
once half the cases have their records, starts the same command again (--skip-existing) and compares the
total with the uninterrupted one-process row: the overhead is the second start-up plus the case that was
in progress when it was killed. The last row restarts the finished run once more: every case is skipped, so its
wall time is what a restart costs by itself (start-up, model load, checking the records).
"""

from __future__ import annotations

import argparse
import os
import platform
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
DEMO_CT = REPO / "samples" / "demo" / "ct" / "phantom-demo.mha"


def write_cases(folder: Path, n: int, slices: int) -> None:
    import SimpleITK as sitk

    folder.mkdir(parents=True)
    image = sitk.ReadImage(str(DEMO_CT))
    size = list(image.GetSize())
    if slices < size[2]:
        image = sitk.Extract(image, [size[0], size[1], slices], [0, 0, 0])
    sitk.WriteImage(image, str(folder / "demo-00.mha"), useCompression=True)
    for i in range(1, n):
        shutil.copyfile(folder / "demo-00.mha", folder / f"demo-{i:02d}.mha")


#: process.py with OpenVINO's threads pinned to cores, as before issue 16 (OpenVINO's default)
PINNED = ("import sys; sys.path.insert(0, {repo!r}); from model.runtimes import cpu as rt; now = rt.OpenVinoRunner.compile_config; "
          "rt.OpenVinoRunner.compile_config = lambda self: {{**now(self), 'ENABLE_CPU_PINNING': True}}; import process; "
          "raise SystemExit(process.main(sys.argv[1:]))")


def command(cases: Path, out: Path, threads: int, *extra: str, pinned: bool = False) -> list[str]:
    program = ["-c", PINNED.format(repo=str(REPO))] if pinned else [str(REPO / "process.py")]
    return [sys.executable, *program, "--input", str(cases), "--output", str(out), "--threads", str(threads), *extra]


def run_processes(commands: list[list[str]]) -> tuple[float, list[float]]:
    """Start all at once, wait for all: (wall seconds, peak RSS MiB of each)."""
    started = time.perf_counter()
    procs = [subprocess.Popen(c, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, cwd=REPO) for c in commands]
    peaks = {}
    while len(peaks) < len(procs):
        pid, status, usage = os.wait4(-1, 0)
        for proc in procs:
            if proc.pid == pid:
                proc.returncode = os.waitstatus_to_exitcode(status)
                peaks[pid] = usage.ru_maxrss / 1024
    wall = time.perf_counter() - started
    for proc in procs:
        err = proc.stderr.read()
        if proc.returncode != 0:
            raise SystemExit(f"{proc.args} exited {proc.returncode}:\n{err[-2000:]}")
    return wall, [peaks[p.pid] for p in procs]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cases", type=int, default=16)
    parser.add_argument("--slices", type=int, default=69, help="first slices of the demo CT per case (default all 69)")
    parser.add_argument("--shards", type=int, nargs="+", default=[2, 4])
    parser.add_argument("--pinning", action="store_true",
                        help="only: 2 shards on this node with OpenVINO's threads pinned as before (old thread default and 1 thread) and unpinned")
    args = parser.parse_args()
    cpus = len(os.sched_getaffinity(0))
    with tempfile.TemporaryDirectory() as temp:
        temp = Path(temp)
        cases = temp / "cases"
        write_cases(cases, args.cases, args.slices)
        print(f"# {platform.processor() or platform.machine()}, {cpus} CPUs, load average {os.getloadavg()[0]:.1f} at start; "
              f"{args.cases} copies of the demo CT, {args.slices} slices each", flush=True)
        print("| run | processes x threads | wall s | cases/min | peak RSS MiB per process |")
        print("|---|---|---:|---:|---|")
        if args.pinning:
            for label, threads, pinned in ((f"2 shards, {cpus} threads each, pinned (before)", cpus, True),
                                           ("2 shards, 1 thread each, pinned", 1, True), ("2 shards, 1 thread each, not pinned (now)", 1, False)):
                wall, peaks = run_processes([command(cases, temp / f"p{threads}{pinned}" / f"shard-{i}", threads, "--shard", f"{i}/2", pinned=pinned)
                                             for i in range(2)])
                print(f"| {label} | 2 x {threads} | {wall:.1f} | {args.cases / wall * 60:.2f} | {', '.join(f'{p:.0f}' for p in peaks)} |", flush=True)
            return
        wall, peaks = run_processes([command(cases, temp / "single", cpus)])
        single_wall = wall
        print(f"| 1 process | 1 x {cpus} | {wall:.1f} | {args.cases / wall * 60:.2f} | {peaks[0]:.0f} |", flush=True)
        for n in args.shards:
            threads = max(1, cpus // n)
            wall, peaks = run_processes([command(cases, temp / f"s{n}" / f"shard-{i}", threads, "--shard", f"{i}/{n}") for i in range(n)])
            print(f"| {n} shards | {n} x {threads} | {wall:.1f} | {args.cases / wall * 60:.2f} | {', '.join(f'{p:.0f}' for p in peaks)} |", flush=True)
        out = temp / "resume"
        resume = command(cases, out, cpus, "--skip-existing")
        started = time.perf_counter()
        proc = subprocess.Popen(resume, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, cwd=REPO)
        while proc.poll() is None and len(list((out / "results").glob("*.json"))) < args.cases // 2:
            time.sleep(0.05)
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
        first = time.perf_counter() - started
        recorded = len(list((out / "results").glob("*.json")))
        wall, peaks = run_processes([resume])
        print(f"| resume: killed after {recorded} of {args.cases} cases, restarted | 1 x {cpus} | {first:.1f} + {wall:.1f} = {first + wall:.1f} "
              f"(overhead {first + wall - single_wall:+.1f} s against 1 process) | {args.cases / (first + wall) * 60:.2f} | {peaks[0]:.0f} |")
        wall, peaks = run_processes([resume])
        print(f"| restart of the finished run: all {args.cases} cases skipped (a restart's fixed cost) | 1 x {cpus} | {wall:.1f} | - | {peaks[0]:.0f} |")
        print(f"# load average {os.getloadavg()[0]:.1f} at the end")


if __name__ == "__main__":
    main()
