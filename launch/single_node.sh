#!/usr/bin/env bash
# One node, one process per module (pipeline) or per data-parallel rank (ddp), via torchrun.
set -euo pipefail

usage() {
    cat <<'USAGE'
usage: launch/single_node.sh [--dry-run] [--mode pipeline|ddp] [--nproc N] CONFIG [--set KEY=VALUE ...]

Runs on this node:
  torchrun --standalone --nproc-per-node K --max-restarts MAX_RESTARTS -m pipeline.train --config CONFIG \
           --set run.mode=pipeline [--set ...]

  --mode pipeline   one process per module of each replica: K x R processes, K = local.modules of CONFIG
                    (after the --set overrides), R = pipeline.replicas (0: --nproc / K).
  --mode ddp        the end-to-end DistributedDataParallel baseline on --nproc N processes (K=1 configs).
  --nproc N         processes to start (pipeline: a multiple of K, default K x R or K; ddp: required).
  --dry-run         check the config, print the command and exit.
  --set KEY=VALUE   goes to pipeline.train, e.g. --set train.epochs=1 --set pipeline.wire_dtype=bf16.
  MAX_RESTARTS=N    restarts after a failure, each resuming from the newest checkpoint set (default 3).
Options may come in any order, before or after CONFIG; after -- everything goes to pipeline.train.
The config is checked (python -m pipeline.train --check) before torchrun starts. When the job fails,
torchrun's own report goes to OUT_DIR/errors/torchrun.log and the terminal ends with the cause.
One GPU per process where there are enough (NCCL), CPU processes (gloo) otherwise.
Example: launch/single_node.sh configs/quickstart.toml --dry-run
         launch/single_node.sh configs/quickstart.toml --nproc 8   (K = 4 x R = 2 replicas)
USAGE
}

# shellcheck source=SCRIPTDIR/lib.sh
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

mode=pipeline
nproc=""
positional=()
train_args=()
while [[ $# -gt 0 ]]; do
    case $1 in
        -h | --help) usage; exit 0 ;;
        --dry-run) DRY_RUN=1 ;;
        --mode) need_value "$@"; mode=$2; shift ;;
        --mode=*) mode=${1#*=} ;;
        --nproc) need_value "$@"; nproc=$2; shift ;;
        --nproc=*) nproc=${1#*=} ;;
        --set) need_value "$@"; train_args+=("$1" "$2"); shift ;;
        --set=*) train_args+=("$1") ;;
        --) shift; train_args+=("$@"); break ;;
        -*) usage >&2; die "unknown option $1" ;;
        *) positional+=("$1") ;;
    esac
    shift
done
[[ ${#positional[@]} -ge 1 ]] || { usage >&2; die "missing CONFIG"; }
[[ ${#positional[@]} -eq 1 ]] || die "one CONFIG expected, got: ${positional[*]} (overrides go after --set)"
config=${positional[0]}

case ${mode} in pipeline | ddp) ;; *) die "--mode must be pipeline or ddp (got '${mode}')" ;; esac
layout=$(config_layout "${mode}" "${config}" "${train_args[@]}") || exit $?
read -r modules replicas out_dir <<<"${layout}"
if [[ ${mode} == pipeline ]]; then
    [[ ${modules} -ge 2 ]] ||
        die "${config} has local.modules = 1: nothing to pipeline; use --mode ddp or python -m pipeline.train"
    nproc=$(pipeline_nproc "${modules}" "${replicas}" 1 "${nproc}" --nproc) || exit $?
else
    [[ -n ${nproc} ]] || die "--mode ddp needs --nproc N (the number of data-parallel processes)"
fi
require_int --nproc "${nproc}"

quiet_torchrun_threads
show_and_run_job "${out_dir}/errors/torchrun.log" "${TORCHRUN}" --standalone --nproc-per-node "${nproc}" \
    --max-restarts "${MAX_RESTARTS}" \
    -m pipeline.train --config "${config}" --set "run.mode=${mode}" "${train_args[@]}"
