#!/usr/bin/env bash
# Test-run built images exactly as Grand Challenge's templates do: `docker run --rm --network none
# -v input:/input:ro -v output:/output -v <volume>:/tmp [-v model:/opt/ml/model:ro] IMAGE`, as the image's
# own non-root USER, on inputs that docker/make_sample.py lays out, and check the outputs with
# docker/check_outputs.py. Needs only the docker CLI and a local engine (./build.sh --test calls it).
#
#   docker/test-images.sh [--algorithm IMAGE] [--evaluation IMAGE] [--gpus]
#
# The input is the bundled sample (samples/demo). Algorithm: a normal run (mask on the CT's grid, uint8,
# results.json), the model override at /opt/ml/model, an empty /input (non-zero exit, no outputs), a
# read-only root filesystem. Evaluation (read-only root): the dense truth as the prediction (mean Dice 1),
# and, with both images, the algorithm's own output scored against the sample's ground truth.
set -euo pipefail

die() { echo "test-images: $*" >&2; exit 2; }
say() { echo "test-images: $*" >&2; }

cd "$(dirname "$0")/.."
docker=${DOCKER:-docker}
algorithm=
evaluation=
gpus=()
while [ $# -gt 0 ]; do
    case "$1" in
        --algorithm) [ $# -ge 2 ] || die "--algorithm needs an image"; algorithm=$2; shift ;;
        --evaluation) [ $# -ge 2 ] || die "--evaluation needs an image"; evaluation=$2; shift ;;
        --gpus) gpus=(--gpus all) ;;
        -h|--help) awk 'NR > 1 && /^#/ { sub(/^# ?/, ""); print; next } NR > 1 { exit }' "$0"; exit 0 ;;
        *) die "unknown argument '$1' (usage: docker/test-images.sh [--algorithm IMAGE] [--evaluation IMAGE] [--gpus])" ;;
    esac
    shift
done
[ -n "$algorithm$evaluation" ] || die "name at least one image (--algorithm IMAGE, --evaluation IMAGE)"
for image in $algorithm $evaluation; do
    "$docker" image inspect "$image" >/dev/null 2>&1 || die "no image $image (build it with ./build.sh)"
done
helper=${algorithm:-$evaluation}  # runs the Python helpers: both images have numpy and SimpleITK

work=$(mktemp -d "${TMPDIR:-/tmp}/trunkseg-test.XXXXXX")
chmod 755 "$work"
volume=trunkseg-test-tmp-$$
failures=0
cleanup() {
    # The containers wrote most of these files (as uid 1001 or root): remove them from inside, as root.
    "$docker" run --rm --network none --user 0 -v "$work:/work" --entrypoint /bin/sh "$helper" -c 'rm -rf /work/* /work/.[!.]*' \
        >/dev/null 2>&1 || true
    rm -rf "$work"
    "$docker" volume rm -f "$volume" >/dev/null 2>&1 || true
}
trap cleanup EXIT

helper_python() {  # a repo script inside the helper image (as root: it reads what uid 1001 wrote); the repo read-only at /src
    "$docker" run --rm --network none --user 0 -v "$PWD:/src:ro" -v "$work:/work" -w /src \
        --entrypoint /opt/venv/bin/python "$helper" "$@"
}

gc_run() {  # gc_run NAME IMAGE INPUT_DIR [docker run options...]: the platform's test run; output in $work/out/NAME
    local name=$1 image=$2 input=$3 output=$work/out/$1
    shift 3
    mkdir -p "$output" && chmod 777 "$output"
    "$docker" volume rm -f "$volume" >/dev/null 2>&1 || true
    "$docker" volume create "$volume" >/dev/null
    local started=$SECONDS status=0
    "$docker" run --rm --network none "${gpus[@]}" -v "$input:/input:ro" -v "$output:/output" -v "$volume:/tmp" "$@" "$image" \
        >"$work/out/$name.log" 2>&1 || status=$?
    say "$name: exit $status in $((SECONDS - started)) s"
    return $status
}

check() {  # check NAME COMMAND...: count a failure, show the container's log
    local name=$1
    shift
    if "$@"; then
        say "PASS $name"
    else
        say "FAIL $name"
        sed 's/^/    /' "$work/out/$name.log" >&2 2>/dev/null || true
        failures=$((failures + 1))
    fi
}

mkdir -p "$work/sample" "$work/out"
chmod 777 "$work/out"
[ -f samples/demo/ct/phantom-demo.mha ] || die "the bundled sample samples/demo/ct/phantom-demo.mha is missing"
helper_python docker/make_sample.py algorithm-input samples/demo/ct/phantom-demo.mha /work/sample/input >/dev/null \
    || die "could not lay out the sample input (docker/make_sample.py in $helper)"
sample=$work/sample

if [ -n "$algorithm" ]; then
    identity=$(helper_python docker/make_sample.py override-model /opt/app/model/packages/demo-phantom /work/sample/model 2>&1 \
        | sed -n 's/.*"identity": "\([^"]*\)".*/\1/p') || true
    [ -n "$identity" ] || die "could not copy the bundled model package out of $algorithm (is it the algorithm image?)"

    run_ok() {  # run_ok NAME [MODEL_IDENTITY] [docker run options...]
        local name=$1 expect=$2
        shift 2
        gc_run "$name" "$algorithm" "$sample/input" "$@" \
            && helper_python docker/check_outputs.py algorithm /work/sample/input "/work/out/$name" ${expect:+--model-identity "$expect"} \
                >>"$work/out/$name.log" 2>&1
    }
    check algorithm-run run_ok algorithm-run ""
    check algorithm-model-override run_ok algorithm-model-override "$identity" -v "$sample/model:/opt/ml/model:ro"
    check algorithm-read-only-root run_ok algorithm-read-only-root "" --read-only

    mkdir -p "$work/empty"
    empty_input_fails() {
        if gc_run algorithm-empty-input "$algorithm" "$work/empty"; then
            echo "an empty /input exited 0" >>"$work/out/algorithm-empty-input.log"; return 1
        fi
        [ -z "$(ls -A "$work/out/algorithm-empty-input")" ] || { echo "an empty /input left outputs" >>"$work/out/algorithm-empty-input.log"; return 1; }
    }
    check algorithm-empty-input empty_input_fails
fi

if [ -n "$evaluation" ]; then
    # The phase's ground truth tarball: the bundled sample's sparse labels (255 = not annotated) and levels.json.
    cp -R samples/demo/ground-truth "$work/ground_truth"
    chmod -R a+rX "$work/ground_truth"
    evaluation_ok() {  # evaluation_ok NAME MASK [check options]: one job whose input was phantom-demo.mha
        local name=$1 mask=$2
        shift 2
        helper_python docker/make_sample.py evaluation-input "/work/$name-input" "phantom-demo.mha=$mask" >/dev/null \
            && gc_run "$name" "$evaluation" "$work/$name-input" -v "$work/ground_truth:/opt/ml/input/data/ground_truth:ro" --read-only \
            && helper_python docker/check_outputs.py evaluation "/work/out/$name" "$@" >>"$work/out/$name.log" 2>&1 \
            && grep -h 'mean Dice' "$work/out/$name.log" | tail -n 1 | sed "s/^/test-images: $name: /" >&2
    }
    # The dense truth as the prediction: a perfect algorithm, mean Dice 1.
    check evaluation-perfect evaluation_ok evaluation-perfect /src/samples/demo/dense-truth/phantom-demo.mha --perfect
    if [ -n "$algorithm" ]; then  # the platform's chain: what the algorithm image wrote, scored
        mask=$(ls "$work/out/algorithm-run/images/muscle-segmentation/"*.mha 2>/dev/null | head -n 1)
        check evaluation-of-algorithm-output evaluation_ok evaluation-of-algorithm-output "/work/out/algorithm-run/images/muscle-segmentation/$(basename "${mask:-missing.mha}")"
    fi
fi

[ "$failures" = 0 ] || die "$failures image test(s) failed"
say "all image tests passed"
