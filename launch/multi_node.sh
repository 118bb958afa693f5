#!/usr/bin/env bash
# Several nodes: start this script once on every node; torchrun's c10d rendezvous joins them.
set -euo pipefail

usage() {
    cat <<'USAGE'
usage: NNODES=N NODE_RANK=R MASTER_ADDR=HOST [MASTER_PORT=29500] [NPROC=P] [RDZV_ID=ID] \
       launch/multi_node.sh [--dry-run] [--mode pipeline|ddp] CONFIG [--set KEY=VALUE ...]

Run it on each of the NNODES nodes (same CONFIG, same --set overrides, NODE_RANK 0..NNODES-1):
  torchrun --nnodes NNODES --node-rank NODE_RANK --nproc-per-node NPROC --max-restarts MAX_RESTARTS \
           --rdzv-backend c10d --rdzv-endpoint MASTER_ADDR:MASTER_PORT --rdzv-id RDZV_ID \
           -m pipeline.train --config CONFIG --set run.mode=pipeline [--set ...]

  NNODES, NODE_RANK, MASTER_ADDR   required (MASTER_ADDR: a host every node reaches; it hosts the rendezvous).
  NPROC    processes per node; pipeline: NPROC x NNODES = K x R (one process per module of each
           replica), default local.modules x pipeline.replicas (or x 1) / NNODES (must divide evenly).
  RDZV_ID  the job's rendezvous id, the same on every node (default: localpipe-<config name>).
  MAX_RESTARTS  restarts after a failure, each resuming from the newest checkpoint set (default 3).
  --mode   pipeline (one process per module, default) or ddp (end-to-end baseline; NPROC required).
  --dry-run  check the config, print the command and exit.
  --set KEY=VALUE  goes to pipeline.train.
Options may come in any order, before or after CONFIG; after -- everything goes to pipeline.train.
The config is checked (python -m pipeline.train --check) before torchrun starts. When the job fails,
torchrun's own report goes to OUT_DIR/errors/torchrun_node_NODE_RANK.log and the terminal ends with the cause.
USAGE
}

# shellcheck source=SCRIPTDIR/lib.sh
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

mode=pipeline
positional=()
train_args=()
while [[ $# -gt 0 ]]; do
    case $1 in
        -h | --help) usage; exit 0 ;;
        --dry-run) DRY_RUN=1 ;;
        --mode) need_value "$@"; mode=$2; shift ;;
        --mode=*) mode=${1#*=} ;;
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

nnodes=${NNODES:-}
node_rank=${NODE_RANK:-}
master_addr=${MASTER_ADDR:-}
master_port=${MASTER_PORT:-29500}
nproc=${NPROC:-}
[[ -n ${nnodes} ]] || { usage >&2; die "set NNODES (the number of nodes)"; }
[[ -n ${node_rank} ]] || { usage >&2; die "set NODE_RANK (0 .. NNODES-1, this node's index)"; }
[[ -n ${master_addr} ]] || { usage >&2; die "set MASTER_ADDR (the host of the rendezvous, e.g. node 0)"; }
require_int NNODES "${nnodes}"
[[ ${node_rank} =~ ^[0-9]+$ && ${node_rank} -lt ${nnodes} ]] ||
    die "NODE_RANK must be 0 .. $((nnodes - 1)) (got '${node_rank}')"
require_int MASTER_PORT "${master_port}"

case ${mode} in pipeline | ddp) ;; *) die "--mode must be pipeline or ddp (got '${mode}')" ;; esac
layout=$(config_layout "${mode}" "${config}" "${train_args[@]}") || exit $?
read -r modules replicas out_dir <<<"${layout}"
case ${mode} in
    pipeline) nproc=$(pipeline_nproc "${modules}" "${replicas}" "${nnodes}" "${nproc}" NPROC) || exit $? ;;
    ddp) [[ -n ${nproc} ]] || die "--mode ddp needs NPROC (processes per node)" ;;
esac
require_int NPROC "${nproc}"
config_name=$(basename "${config}" .toml)
rdzv_id=${RDZV_ID:-localpipe-${config_name}}

quiet_torchrun_threads
show_and_run_job "${out_dir}/errors/torchrun_node_${node_rank}.log" "${TORCHRUN}" --nnodes "${nnodes}" \
    --node-rank "${node_rank}" --nproc-per-node "${nproc}" --max-restarts "${MAX_RESTARTS}" \
    --rdzv-backend c10d --rdzv-endpoint "${master_addr}:${master_port}" --rdzv-id "${rdzv_id}" \
    -m pipeline.train --config "${config}" --set "run.mode=${mode}" "${train_args[@]}"
