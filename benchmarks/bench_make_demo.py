"""`make demo` on a fresh clone: install time, demo time, venv size, pip errors; baseline and candidate in one run.

    python benchmarks/bench_make_demo.py [--baseline-ref e1674a8] [--candidate-ref HEAD] [--work /tmp]

Each ref is cloned from this repository into a new folder under --work, `make demo` runs there (first
the venv it needs, then the demo itself) with an empty pip cache of its own, so both start cold; the
clone is deleted afterwards. pip uses the machine's own configuration (its indexes and find-links),
as a developer's `make demo` would. Prints a markdown table for docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def folder_bytes(folder: Path) -> int:
    return sum(p.lstat().st_size for p in folder.rglob("*") if p.is_file() and not p.is_symlink())


def run(command: list[str], *, cwd: Path, env: dict) -> tuple[float, str, int]:
    started = time.perf_counter()
    done = subprocess.run(command, cwd=cwd, env=env, capture_output=True, text=True)
    return time.perf_counter() - started, done.stdout + done.stderr, done.returncode


def measure(ref: str, work: Path) -> dict:
    clone = Path(tempfile.mkdtemp(prefix="bench-make-demo-", dir=work))
    try:
        subprocess.run(["git", "clone", "--quiet", str(REPO), str(clone / "repo")], check=True)
        repo = clone / "repo"
        subprocess.run(["git", "-C", str(repo), "checkout", "--quiet", ref], check=True)
        commit = subprocess.run(["git", "-C", str(repo), "rev-parse", "--short", "HEAD"], check=True, capture_output=True, text=True).stdout.strip()
        env = {**os.environ, "PIP_CACHE_DIR": str(clone / "pip-cache")}
        env.pop("VIRTUAL_ENV", None)
        makefile = (repo / "Makefile").read_text()
        stamp = ".venv-demo/.installed" if "DEMO_STAMP" in makefile else ".venv/.installed"
        install_s, install_log, code = run(["make", stamp], cwd=repo, env=env)
        if code != 0:
            raise SystemExit(f"{ref}: make {stamp} failed:\n{install_log[-3000:]}")
        demo_s, demo_log, code = run(["make", "demo"], cwd=repo, env=env)
        if code != 0:
            raise SystemExit(f"{ref}: make demo failed:\n{demo_log[-3000:]}")
        venv = repo / stamp.split("/")[0]
        site = next(venv.glob("lib/python3*/site-packages"))
        log = install_log + demo_log
        for line in log.splitlines():
            if line.startswith("ERROR"):
                print(f"{ref}: {line}", file=sys.stderr)
        return {
            "ref": f"{ref} ({commit})",
            "venv": venv.name,
            "install_s": install_s,
            "demo_s": demo_s,
            "venv_mib": folder_bytes(venv) / 2**20,
            "packages": len(list(site.glob("*.dist-info"))),
            "torch": (site / "torch").is_dir(),
            "nnunetv2": (site / "nnunetv2").is_dir(),
            "pytest": (site / "pytest").is_dir() or (site / "_pytest").is_dir(),
            "pip_errors": sum(1 for line in log.splitlines() if line.startswith("ERROR")),
        }
    finally:
        shutil.rmtree(clone, ignore_errors=True)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--baseline-ref", default="e1674a8")
    parser.add_argument("--candidate-ref", default="HEAD")
    parser.add_argument("--work", type=Path, default=Path("/tmp"))
    args = parser.parse_args()
    rows = []
    for ref in (args.baseline_ref, args.candidate_ref):
        ref = subprocess.run(["git", "-C", str(REPO), "rev-parse", "--short", ref], check=True, capture_output=True, text=True).stdout.strip()
        print(f"measuring make demo at {ref} ...", file=sys.stderr, flush=True)
        rows.append(measure(ref, args.work))
    print("| ref | venv | install s | demo run s | total s | venv MiB | packages | torch | nnunetv2 | pytest | pip ERROR lines |")
    print("|---|---|---:|---:|---:|---:|---:|---|---|---|---:|")
    for r in rows:
        print(f"| {r['ref']} | {r['venv']} | {r['install_s']:.0f} | {r['demo_s']:.0f} | {r['install_s'] + r['demo_s']:.0f} | "
              f"{r['venv_mib']:.0f} | {r['packages']} | {'yes' if r['torch'] else 'no'} | {'yes' if r['nnunetv2'] else 'no'} | "
              f"{'yes' if r['pytest'] else 'no'} | {r['pip_errors']} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
