"""Speed on a shared node: the image against the host, idle and under a competing load, per CPU runtime,
today's runtime settings (baseline) against the new ones (candidate), all in one run.

    python benchmarks/bench_contention.py                       # host and image (needs ./build.sh cpu and dockerd)
    python benchmarks/bench_contention.py --no-image            # host only

Each row is one process.py run (in-process, default precision) over the first --slices slices of the
bundled demo CT, in a fresh process: on the host, or in the algorithm image with `docker run` (no --cpus:
Grand Challenge's and a plain `docker run`'s case). "ms/slice" is process.py's own figure (segment time
per slice). The competing load runs on the host: one process spinning on a core and one spinning half of
each 20 ms (about 1.5 cores in all), like another job on the same node.

baseline: threads = every CPU the process may run on (process.py's old --threads default), OpenVINO's
own defaults for pinning. candidate: what process.py and model/runtimes/cpu.py do now (threads = the CPUs the
scheduler grants, preprocess/limits.py detect_granted_cpus; OpenVINO threads not pinned). The OpenVINO columns
say what the compiled model reports it does (ENABLE_CPU_PINNING, INFERENCE_NUM_THREADS, NUM_STREAMS).
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import platform
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
DEMO_CT = REPO / "samples" / "demo" / "ct" / "phantom-demo.mha"
IMAGE = "trunkseg-algorithm:cpu"
LOAD_CODE = """
import os, sys, time
share, pinned = float(sys.argv[1]), sys.argv[2] == "pinned"
full, part = int(share), share - int(share)
cpus = sorted(os.sched_getaffinity(0))
children = []
for i in range(full + (1 if part > 0 else 0)):
    pid = os.fork()
    if pid == 0:
        if pinned:  # like another job whose runtime pins its threads: it cannot make room by moving
            os.sched_setaffinity(0, {cpus[i % len(cpus)]})
        duty = 1.0 if i < full else part
        while True:
            start = time.perf_counter()
            while time.perf_counter() - start < 0.02 * duty:
                pass
            if duty < 1.0:
                time.sleep(0.02 * (1 - duty))
    children.append(pid)
os.wait()
"""


def worker(args: argparse.Namespace) -> None:
    """One run in this process: print a JSON line with ms/slice, threads and OpenVINO's effective settings."""
    sys.path.insert(0, args.app)
    import process
    from model.runtimes import cpu as rt

    extra = []
    if args.settings == "baseline":  # the settings before issue 16
        candidate_config = rt.OpenVinoRunner.compile_config

        def baseline_config(self):
            config = candidate_config(self)
            config.pop("ENABLE_CPU_PINNING", None)
            return config

        rt.OpenVinoRunner.compile_config = baseline_config
        extra = ["--threads", str(len(os.sched_getaffinity(0)))]
    effective = {}
    if args.runtime == "openvino":
        original_enter = rt.OpenVinoRunner.__enter__

        def enter(self):
            runner = original_enter(self)
            for key in ("ENABLE_CPU_PINNING", "INFERENCE_NUM_THREADS", "NUM_STREAMS"):
                try:
                    effective[key] = str(self.request.get_compiled_model().get_property(key))
                except Exception as error:  # a property this OpenVINO does not report
                    effective[key] = f"? ({type(error).__name__})"
            return runner

        rt.OpenVinoRunner.__enter__ = enter
    out = tempfile.mkdtemp(prefix="bench-contention-")
    stream = io.StringIO()
    with contextlib.redirect_stderr(stream):
        code = process.main(["--input", args.ct, "--output", out, "--runtime", args.runtime, "--time-limit-s", "0", *extra])
    shutil.rmtree(out, ignore_errors=True)
    text = stream.getvalue()
    if code != 0:
        raise SystemExit(f"process.py exited {code}:\n{text[-2000:]}")
    ms = re.search(r"(\d+) ms/slice", text)
    threads = re.search(r"(\d+) thread\(s\) \(([^)]*)\)", text)
    precision = re.search(r"precision (\S+)", text)
    print(json.dumps({"ms_per_slice": int(ms[1]), "threads": int(threads[1]), "threads_origin": threads[2], "precision": precision[1],
                      "openvino": effective}))


def write_ct(folder: Path, slices: int) -> Path:
    import SimpleITK as sitk

    image = sitk.ReadImage(str(DEMO_CT))
    size = list(image.GetSize())
    part = sitk.Extract(image, [size[0], size[1], min(slices, size[2])], [0, 0, 0])
    folder.mkdir(parents=True, exist_ok=True)
    sitk.WriteImage(part, str(folder / "demo.mha"), useCompression=True)
    folder.chmod(0o755)
    (folder / "demo.mha").chmod(0o644)
    return folder


def run_once(where: str, runtime: str, settings: str, ct_dir: Path, image: str, docker_cpus: str | None = None) -> dict:
    worker_args = ["--worker", "--runtime", runtime, "--settings", settings]
    if where == "host":
        command = [sys.executable, str(Path(__file__).resolve()), *worker_args, "--app", str(REPO), "--ct", str(ct_dir)]
    else:
        command = ["docker", "run", "--rm", "--network", "none", "--tmpfs", "/tmp", *(["--cpus", docker_cpus] if docker_cpus else []), "-v", f"{Path(__file__).resolve().parent}:/bench:ro",
                   "-v", f"{ct_dir}:/ct:ro", "--entrypoint", "/opt/venv/bin/python", image, "/bench/bench_contention.py", *worker_args,
                   "--app", "/opt/app", "--ct", "/ct"]
    done = subprocess.run(command, capture_output=True, text=True, timeout=1800, cwd=REPO)
    if done.returncode != 0:
        raise SystemExit(f"{where} {runtime} {settings} failed ({done.returncode}):\n{done.stdout[-1000:]}\n{done.stderr[-2000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


@contextlib.contextmanager
def competing_load(cores: float, kind: str):
    if cores <= 0:
        yield
        return
    load = subprocess.Popen([sys.executable, "-c", LOAD_CODE, str(cores), kind], start_new_session=True)
    time.sleep(1.0)
    try:
        yield
    finally:
        os.killpg(load.pid, 15)  # the load's own process group: the process started here and its forks
        load.wait()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--app", default=str(REPO), help=argparse.SUPPRESS)
    parser.add_argument("--ct", help=argparse.SUPPRESS)
    parser.add_argument("--settings", choices=("baseline", "candidate"), default="candidate", help=argparse.SUPPRESS)
    parser.add_argument("--runtime", default="openvino", help=argparse.SUPPRESS)
    parser.add_argument("--runtimes", nargs="+", default=["openvino", "onnxruntime"])
    parser.add_argument("--slices", type=int, default=24, help="first slices of the demo CT (default 24)")
    parser.add_argument("--load-cores", type=float, default=1.5, help="cores the competing load keeps busy (default 1.5)")
    parser.add_argument("--load-kind", choices=("floating", "pinned"), default="floating",
                        help="floating: the load's processes go where the kernel puts them; pinned: each is pinned to one core")
    parser.add_argument("--no-idle", action="store_true", help="only the rows under load")
    parser.add_argument("--image", default=IMAGE)
    parser.add_argument("--no-image", action="store_true", help="host rows only")
    parser.add_argument("--no-host", action="store_true", help="image rows only")
    parser.add_argument("--docker-cpus", default=None, help="run the image with docker run --cpus (a cgroup CPU quota, as a Kubernetes CPU limit sets)")
    args = parser.parse_args()
    if args.worker:
        worker(args)
        return
    places = [p for p, off in (("host", args.no_host), ("image", args.no_image)) if not off]
    with tempfile.TemporaryDirectory() as temp:
        ct_dir = write_ct(Path(temp) / "ct", args.slices)
        Path(temp).chmod(0o755)
        print(f"# {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.1f} at start; "
              f"demo CT, first {args.slices} slices; competing load {args.load_cores:g} cores, {args.load_kind}", flush=True)
        print("| where | load | runtime | settings | precision | threads | OpenVINO pinning / threads / streams | ms/slice |")
        print("|---|---|---|---|---|---|---|---:|")
        for load in ((args.load_cores,) if args.no_idle else (0.0, args.load_cores)):
            with competing_load(load, args.load_kind):
                for where in places:
                    for runtime in args.runtimes:
                        for settings in ("baseline", "candidate"):
                            row = run_once(where, runtime, settings, ct_dir, args.image, args.docker_cpus)
                            ov = row["openvino"]
                            ov_text = " / ".join(ov.get(k, "") for k in ("ENABLE_CPU_PINNING", "INFERENCE_NUM_THREADS", "NUM_STREAMS")) if ov else "-"
                            place = f"image --cpus {args.docker_cpus}" if where == "image" and args.docker_cpus else where
                            print(f"| {place} | {'idle' if not load else f'{load:g} cores busy ({args.load_kind})'} | {runtime} | {settings} | {row['precision']} | "
                                  f"{row['threads']} | {ov_text} | {row['ms_per_slice']} |", flush=True)
        print(f"# load average {os.getloadavg()[0]:.1f} at the end")


if __name__ == "__main__":
    main()
