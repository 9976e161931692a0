#!/usr/bin/env bash
# Build the two container images: the algorithm (Dockerfile) and the evaluation (evaluation/Dockerfile).
#
#   ./build.sh [options] [cpu|gpu]
#
#   cpu (default)      trunkseg-algorithm:cpu: ONNX Runtime only, no torch (small)
#   gpu                trunkseg-algorithm:gpu: torch with CUDA 13 (+ TensorRT); needs a machine that reaches
#                      PyPI and NVIDIA's package index, and several GB of disk; run with --gpus all
#   --local-base       first make trunkseg-base:bookworm with debootstrap (docker/make-local-base.sh) and
#                      build on it: for an engine that reaches no image registry (this project's machines, CI)
#   --test             run each image on a phantom CT exactly as Grand Challenge does (--network none,
#                      read-only /input, the image's non-root user) and check the outputs
#   --save             write the images as build/images/<name>-<tag>.tar.gz (Grand Challenge's upload format)
#   --model DIR        bake DIR in as the bundled model package (default model/packages/demo-phantom)
#   --only NAME        build only `algorithm` or `evaluation`
#   --no-cache         build without the engine's layer cache
#   --no-tensorrt      gpu: leave TensorRT out (its wheels come from NVIDIA's package index, not PyPI)
#
# Environment: BASE_IMAGE (default python:3.11-slim-bookworm; a Debian bookworm image with Python 3.11),
# PYTHON (the Python whose pip downloads the wheels; default .venv/bin/python, else python3), DOCKER.
# The wheels are downloaded on the host into build/wheels/<set>/ (kept between builds) and installed in
# the image with `pip install --no-index`: the build itself needs no network.
set -euo pipefail

die() { echo "build.sh: $*" >&2; exit 2; }
say() { echo "build.sh: $*" >&2; }

cd "$(dirname "$0")"
flavour=cpu
local_base=0
run_test=0
save=0
only=
model=model/packages/demo-phantom
cache_args=()
tensorrt=1
while [ $# -gt 0 ]; do
    case "$1" in
        cpu|gpu) flavour=$1 ;;
        --local-base) local_base=1 ;;
        --test) run_test=1 ;;
        --save) save=1 ;;
        --no-cache) cache_args=(--no-cache) ;;
        --no-tensorrt) tensorrt=0 ;;
        --model) [ $# -ge 2 ] || die "--model needs a folder"; model=$2; shift ;;
        --model=*) model=${1#--model=} ;;
        --only) [ $# -ge 2 ] || die "--only needs algorithm or evaluation"; only=$2; shift ;;
        --only=*) only=${1#--only=} ;;
        -h|--help) awk 'NR > 1 && /^#/ { sub(/^# ?/, ""); print; next } NR > 1 { exit }' "$0"; exit 0 ;;
        *) die "unknown argument '$1' (usage: ./build.sh [--local-base] [--test] [--save] [--model DIR] [--only algorithm|evaluation] [--no-cache] [--no-tensorrt] [cpu|gpu])" ;;
    esac
    shift
done
case "$only" in ""|algorithm|evaluation) ;; *) die "--only takes algorithm or evaluation, not '$only'" ;; esac
build_algorithm=1; build_evaluation=1
[ "$only" = evaluation ] && build_algorithm=0
[ "$only" = algorithm ] && build_evaluation=0

docker=${DOCKER:-docker}
command -v "$docker" >/dev/null || die "no '$docker' command: install Docker (Debian: apt-get install -y docker.io)"
"$docker" info >/dev/null 2>&1 || die "no Docker engine reachable: start it (dockerd &) or set DOCKER_HOST"

if [ -n "${PYTHON:-}" ]; then python=$PYTHON
elif [ -x .venv/bin/python ]; then python=.venv/bin/python
else python=python3; fi
"$python" -m pip --version >/dev/null 2>&1 || die "$python has no pip: set PYTHON to a Python with pip (it only downloads wheels)"

if [ "$build_algorithm" = 1 ]; then
    [ -f "$model/model.json" ] || die "$model is not a model package (no model.json): train it with 'make demo', or pass --model DIR"
    model=$(cd "$model" && pwd)
    case "$model" in
        "$PWD"/model/packages/*|"$PWD"/build/model-package) model_arg=${model#"$PWD"/} ;;
        *)  # outside the build context: stage a copy where .dockerignore lets it through
            rm -rf build/model-package && mkdir -p build && cp -R "$model" build/model-package
            model_arg=build/model-package ;;
    esac
fi
if [ "$build_evaluation" = 1 ] && [ ! -f evaluation/__main__.py ]; then
    die "evaluation/__main__.py is missing: the evaluation image has no entry point (use --only algorithm)"
fi

if [ "$local_base" = 1 ]; then
    [ -z "${BASE_IMAGE:-}" ] || [ "$BASE_IMAGE" = trunkseg-base:bookworm ] || die "--local-base and BASE_IMAGE=$BASE_IMAGE contradict each other"
    command -v debootstrap >/dev/null || "$docker" image inspect trunkseg-base:bookworm >/dev/null 2>&1 \
        || die "--local-base needs debootstrap (Debian: apt-get install -y debootstrap)"
    DOCKER=$docker docker/make-local-base.sh trunkseg-base:bookworm
    base=trunkseg-base:bookworm
else
    base=${BASE_IMAGE:-python:3.11-slim-bookworm}
fi

# --- wheels: downloaded once on the host, for CPython 3.11 on glibc x86_64 (Debian bookworm's glibc 2.36);
# the same platform as docker/lock_requirements.py, which writes requirements/lock/<set>.txt (hash-pinned)
platform_args=(--only-binary=:all: --python-version 3.11 --implementation cp --platform manylinux2014_x86_64 --platform any)
for minor in $(seq 17 36); do platform_args+=(--platform "manylinux_2_${minor}_x86_64"); done

# download_wheels SET REQUIREMENTS [NO_DEPS_REQUIREMENTS]: build/wheels/SET/ with the wheels and the
# option-free requirement lists the Dockerfile installs (requirements.txt, no-deps.txt).
download_wheels() {
    local set=$1 requirements=$2 no_deps=${3:-} dir=build/wheels/$1 key hashes=()
    if [ -f "requirements/lock/$set.txt" ]; then  # hash-pinned: pip checks every wheel's SHA-256, here and in the image
        "$python" docker/lock_requirements.py --check || die "the lock files are stale (above): run docker/lock_requirements.py"
        requirements=requirements/lock/$set.txt
        hashes=(--require-hashes)
    else
        say "no lock for $set: its wheels are pinned by version only (not by hash)"
    fi
    key=$(cat "$requirements" ${no_deps:+"$no_deps"} | cat - <(printf '%s\n' "${platform_args[@]}") | sha256sum | cut -c1-16)
    if [ -f "$dir/.key" ] && [ "$(cat "$dir/.key")" = "$key" ]; then
        say "wheels for $set are up to date in $dir ($(du -sh "$dir" | cut -f1))"
        return
    fi
    say "downloading the wheels for $set into $dir"
    rm -rf "$dir" && mkdir -p "$dir"
    local started=$SECONDS
    "$python" -m pip download --quiet --disable-pip-version-check --dest "$dir" "${platform_args[@]}" "${hashes[@]}" -r "$requirements" \
        2> >(grep -v 'is ignored: it is neither a file nor a directory' >&2) \
        || die "pip download failed for $requirements (is PyPI reachable?)"
    grep -hvE '^[[:space:]]*(-|#|$)' "$requirements" >"$dir/requirements.txt"
    : >"$dir/no-deps.txt"
    if [ -n "$no_deps" ]; then
        "$python" -m pip download --quiet --disable-pip-version-check --no-deps --dest "$dir" "${platform_args[@]}" -r "$no_deps" \
            2> >(grep -v 'is ignored: it is neither a file nor a directory' >&2) \
            || die "pip download failed for $no_deps"
        grep -hvE '^[[:space:]]*(-|#|$)' "$no_deps" >"$dir/no-deps.txt"
    fi
    echo "$key" >"$dir/.key"
    say "downloaded $(ls "$dir"/*.whl | wc -l) wheels ($(du -sh "$dir" | cut -f1)) in $((SECONDS - started)) s"
}

built=()
build_image() {  # build_image TAG DOCKERFILE [--build-arg ...]
    local tag=$1 dockerfile=$2 started=$SECONDS
    shift 2
    say "building $tag from $dockerfile on $base"
    "$docker" build "${cache_args[@]}" --file "$dockerfile" --tag "$tag" --build-arg "BASE_IMAGE=$base" \
        --build-arg "VERSION=$(git describe --always --dirty 2>/dev/null || echo dev)" "$@" . \
        || die "docker build of $tag failed (output above)"
    say "built $tag in $((SECONDS - started)) s"
    built+=("$tag")
}

if [ "$build_algorithm" = 1 ]; then
    if [ "$flavour" = cpu ]; then
        download_wheels algorithm-cpu requirements/runtime-cpu.txt
    else
        # runtime-cpu.txt + torch & co; the U-Net package (no-deps.txt's pin) without its declared dependencies
        mkdir -p build
        cat requirements/runtime-cpu.txt docker/requirements-gpu.txt \
            | { if [ "$tensorrt" = 1 ]; then cat; else grep -viE '^(tensorrt|--extra-index-url https://pypi\.nvidia\.com)'; fi; } \
            >build/requirements-gpu.txt
        grep -iE '^dynamic[-_]network[-_]architectures[=<>~ ]' requirements/no-deps.txt >build/no-deps-gpu.txt \
            || die "requirements/no-deps.txt pins no dynamic-network-architectures (the gpu flavour's U-Net)"
        download_wheels algorithm-gpu build/requirements-gpu.txt build/no-deps-gpu.txt
    fi
    build_image "trunkseg-algorithm:$flavour" Dockerfile --build-arg "FLAVOUR=$flavour" --build-arg "MODEL_PACKAGE=$model_arg"
fi
if [ "$build_evaluation" = 1 ]; then
    download_wheels evaluation requirements/evaluation.txt
    build_image trunkseg-evaluation:latest evaluation/Dockerfile
fi

if [ "$run_test" = 1 ]; then
    test_args=()
    [ "$build_algorithm" = 1 ] && test_args+=(--algorithm "trunkseg-algorithm:$flavour")
    [ "$build_evaluation" = 1 ] && test_args+=(--evaluation trunkseg-evaluation:latest)
    [ "$flavour" = gpu ] && test_args+=(--gpus)
    DOCKER=$docker docker/test-images.sh "${test_args[@]}" || die "the image test failed (output above)"
fi

if [ "$save" = 1 ]; then
    mkdir -p build/images
    for tag in "${built[@]}"; do
        file=build/images/${tag/:/-}.tar.gz
        started=$SECONDS
        "$docker" save "$tag" | gzip -1 >"$file.partial" && mv "$file.partial" "$file"
        say "saved $tag to $file ($(du -h "$file" | cut -f1)) in $((SECONDS - started)) s"
    done
fi

for tag in "${built[@]}"; do
    size=$("$docker" image inspect --format '{{.Size}}' "$tag")
    printf '%-32s %5d MB\n' "$tag" "$((size / 1000000))"
done
