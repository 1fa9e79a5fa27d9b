#!/usr/bin/env bash
# The pipeline without Python submission: prepare -> align -> sft -> infer array -> merge -> eval, each
# after the one before succeeds (a failure cancels the rest). Prints the job ids and returns.
#   jobs/sbatch/pipeline.sh CONFIG RUN_ID CHUNKS [key=value ...]
# Training shape: TRAIN_NODES (default 1) x GPUS per node (default 0 = CPU); CPUS_PER_TASK (default 8) for
# every job; ARRAY_PARALLELISM (default 16). Options for every job come
# from sbatch's environment: SBATCH_PARTITION, SBATCH_ACCOUNT, SBATCH_QOS, SBATCH_TIMELIMIT, ...
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
config=$1 run_id=$2 chunks=$3
shift 3
nodes=${TRAIN_NODES:-1} gpus=${GPUS:-0}
gres=()
[ "$gpus" -gt 0 ] && gres=(--gpus-per-node="$gpus")
after() { printf -- '--dependency=afterok:%s --kill-on-invalid-dep=yes' "$1"; }
submit() { local id; id=$(sbatch --parsable --cpus-per-task="${CPUS_PER_TASK:-8}" "$@"); echo "${id%%;*}"; }

prepare=$(submit "$here/stage.sbatch" prepare "$config" "$run_id" "$@")
align=$(submit $(after "$prepare") --nodes="$nodes" "${gres[@]}" "$here/train.sbatch" align "$config" "$run_id" "$@")
sft=$(submit $(after "$align") --nodes="$nodes" "${gres[@]}" "$here/train.sbatch" sft "$config" "$run_id" "$@")
chunks_id=$(submit $(after "$sft") --array="0-$(( chunks - 1 ))%${ARRAY_PARALLELISM:-16}" "$here/infer_array.sbatch" "$config" "$run_id" "$@")
merge=$(submit $(after "$chunks_id") "$here/stage.sbatch" infer "$config" "$run_id" "infer.chunks=$chunks" "$@" \
  --merge-only)
eval_id=$(submit $(after "$merge") "$here/stage.sbatch" eval "$config" "$run_id" "$@")
printf '%-8s %s\n' prepare "$prepare" align "$align" sft "$sft" infer "$chunks_id" merge "$merge" eval "$eval_id"
