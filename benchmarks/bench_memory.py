"""Peak memory of process.py against the up-front estimate that refuses volumes too large for the budget.

    .venv/bin/python benchmarks/bench_memory.py [--slices 300 1000] [--size 512] [--threads 2] [--bound-gb 6]

For each slice count: a 512x512xN phantom CT (int16, compressed .mha) runs through the real entry point
in its own process (ONNX Runtime, the CPU default); peak RSS is that process's (os.wait4). Next to it:
the estimate of preprocess/limits.py (what --memory-limit-gb is compared with, from the header) and the
stated bound. Then the refusal: a header that claims 512x512x3000 voxels (its data missing) is refused
in a fresh process under --memory-limit-gb 6, and the time that took. Prints a markdown table for
docs/benchmarks.md; the 300-slice row is the baseline the per-voxel slope is read from.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import SimpleITK as sitk

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from preprocess.limits import estimate_peak_bytes  # noqa: E402

GIB = 2**30


def run_process(args: list[str]) -> tuple[int, float, float, str]:
    """Exit code, wall seconds, peak RSS (GiB) and stderr of one process.py run."""
    started = time.perf_counter()
    child = subprocess.Popen([sys.executable, str(REPO / "process.py"), *args], stderr=subprocess.PIPE, text=True)
    stderr = child.stderr.read()
    _, status, usage = os.wait4(child.pid, 0)
    return os.waitstatus_to_exitcode(status), time.perf_counter() - started, usage.ru_maxrss * 1024 / GIB, stderr


def write_claiming_header(path: Path, size_xyz: tuple[int, int, int]) -> None:
    """A .mha whose header claims `size_xyz` int16 voxels and whose data is missing (a few bytes)."""
    header = (
        "ObjectType = Image\nNDims = 3\nBinaryData = True\nBinaryDataByteOrderMSB = False\nCompressedData = False\n"
        f"DimSize = {size_xyz[0]} {size_xyz[1]} {size_xyz[2]}\nElementSpacing = 0.8 0.8 0.5\nElementType = MET_SHORT\n"
        "ElementDataFile = LOCAL\n"
    )
    path.write_bytes(header.encode() + b"\0" * 64)


def write_phantom(path: str, size: int, n_slices: int) -> None:
    from model.phantom import make_phantom

    phantom = make_phantom(2024, size_xy=(size, size), spacing_mm=(0.8, 0.8, 1.0), n_slices=n_slices)
    sitk.WriteImage(phantom.geometry.apply_to(sitk.GetImageFromArray(phantom.ct_zyx)), path, useCompression=True)


def main() -> int:
    if len(sys.argv) == 5 and sys.argv[1] == "--write-phantom":
        write_phantom(sys.argv[2], int(sys.argv[3]), int(sys.argv[4]))
        return 0
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--slices", type=int, nargs="+", default=[300, 1000])
    parser.add_argument("--size", type=int, default=512)
    parser.add_argument("--threads", type=int, default=len(os.sched_getaffinity(0)))
    parser.add_argument("--bound-gb", type=float, default=6.0, help="the stated peak-memory bound (GiB)")
    args = parser.parse_args()

    work = Path(tempfile.mkdtemp(prefix="trunkseg-bench-memory-"))
    rows = []
    for n in args.slices:
        folder = work / f"in-{n}"
        folder.mkdir()
        # In a child process: Linux carries a parent's peak RSS at fork into the child's ru_maxrss, so this
        # process must stay small for the figures below to be process.py's own.
        subprocess.run([sys.executable, __file__, "--write-phantom", str(folder / "bench.mha"), str(args.size), str(n)], check=True)
        out = work / f"out-{n}"
        code, wall, peak, stderr = run_process(["--input", str(folder), "--output", str(out), "--threads", str(args.threads)])
        if code != 0:
            raise SystemExit(f"process.py failed ({code}) on {n} slices:\n{stderr}")
        case = json.loads((out / "results.json").read_text())["cases"][0]
        estimate = estimate_peak_bytes((args.size, args.size, n), stored_bytes_per_voxel=2) / GIB
        rows.append((f"{args.size}x{args.size}x{n}", case["runtime"], wall, case["timings_s"], peak, estimate))
        print(f"{n} slices: peak {peak:.2f} GiB, estimate {estimate:.2f} GiB, {wall:.0f} s", file=sys.stderr, flush=True)

    print(f"| CT (int16 .mha) | runtime | process wall s | read s | segment s | measure s | peak RSS GiB | estimate GiB | bound GiB |")
    print("|---|---|---:|---:|---:|---:|---:|---:|---:|")
    for name, runtime, wall, t, peak, estimate in rows:
        print(f"| {name} | {runtime} | {wall:.0f} | {t['read']:.1f} | {t['segment']:.0f} | {t['measure']:.1f} | {peak:.2f} | {estimate:.2f} | {args.bound_gb:g} |")
    if len(rows) >= 2:
        (a, b) = rows[0], rows[-1]
        voxels = [args.size * args.size * n for n in (args.slices[0], args.slices[-1])]
        slope = (b[4] - a[4]) * GIB / (voxels[1] - voxels[0])
        print(f"\nmeasured slope {slope:.1f} bytes/voxel, intercept {(a[4] * GIB - slope * voxels[0]) / 2**20:.0f} MiB")

    huge = work / "claims-3000"
    huge.mkdir()
    write_claiming_header(huge / "huge.mha", (args.size, args.size, 3000))
    code, wall, peak, stderr = run_process(["--input", str(huge), "--output", str(work / "out-huge"), "--memory-limit-gb", str(args.bound_gb)])
    line = next((l for l in stderr.splitlines() if l.startswith("error:")), "")
    print(f"\nthis script's own peak RSS (a floor under the figures above): {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20:.2f} GiB")
    print(f"\nheader claiming {args.size}x{args.size}x3000: exit {code} in {wall:.1f} s (process start included), peak RSS {peak:.2f} GiB:\n    {line}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
