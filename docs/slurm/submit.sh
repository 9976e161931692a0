#!/bin/bash
# Submit the array over N shards and, after it, one job that merges them into $TRUNKSEG_OUTPUT/merged.
#
#   TRUNKSEG_INPUT=/data/cts TRUNKSEG_OUTPUT=/scratch/trunkseg docs/slurm/submit.sh 16 [more sbatch options]
#
# The merge job runs once every array task has ended (afterany), so that it can name the shards that
# failed; resubmit those tasks (sbatch --array=<ids> ...: they resume) and merge again.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
shards=${1:?usage: submit.sh N_SHARDS [sbatch options]}
shift
home=${TRUNKSEG_HOME:-$(cd "$here/../.." && pwd)}
python=${TRUNKSEG_PYTHON:-$home/.venv/bin/python}
export TRUNKSEG_HOME=$home TRUNKSEG_PYTHON=$python
array=$(sbatch --parsable --array="0-$((shards - 1))" "$@" "$here/trunkseg-array.sbatch")
array=${array%%;*}
merge=$(sbatch --parsable --dependency="afterany:$array" --job-name=trunkseg-merge --cpus-per-task=1 --mem=2G "$@" \
    --output="trunkseg-merge-%j.out" --wrap "cd '$home' && exec '$python' -m postprocess.merge '$TRUNKSEG_OUTPUT'/shard-* --output '$TRUNKSEG_OUTPUT/merged'")
echo "array job $array ($shards shards), merge job $merge -> $TRUNKSEG_OUTPUT/merged"
