#!/usr/bin/env bash
# One node, one process per module (pipeline) or per data-parallel rank (ddp), via torchrun.
set -euo pipefail

usage() {
    cat <<'USAGE'
usage: launch/single_node.sh [--dry-run] [--mode pipeline|ddp] [--nproc N] CONFIG [TRAIN ARGS...]

Runs on this node:
  torchrun --standalone --nproc-per-node K -m pipeline.train --config CONFIG --set run.mode=pipeline [TRAIN ARGS...]

  --mode pipeline   one process per module; K = local.modules of CONFIG (after any --set in TRAIN ARGS).
  --mode ddp        the end-to-end DistributedDataParallel baseline on --nproc N processes (K=1 configs).
  --nproc N         processes to start (pipeline: must equal K; ddp: required).
  --dry-run         print the command and exit.
TRAIN ARGS go to pipeline.train unchanged, e.g. --set train.epochs=1 --set pipeline.wire_dtype=bf16.
One GPU per process where there are enough (NCCL), CPU processes (gloo) otherwise.
Example: launch/single_node.sh configs/quickstart.toml
USAGE
}

# shellcheck source=SCRIPTDIR/lib.sh
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

mode=pipeline
nproc=""
while [[ $# -gt 0 ]]; do
    case $1 in
        -h | --help) usage; exit 0 ;;
        --dry-run) DRY_RUN=1; shift ;;
        --mode) [[ $# -ge 2 ]] || die "--mode needs a value"; mode=$2; shift 2 ;;
        --nproc) [[ $# -ge 2 ]] || die "--nproc needs a value"; nproc=$2; shift 2 ;;
        --) shift; break ;;
        -*) usage >&2; die "unknown option $1" ;;
        *) break ;;
    esac
done
[[ $# -ge 1 ]] || { usage >&2; die "missing CONFIG"; }
config=$1
shift

case ${mode} in
    pipeline)
        modules=$(config_modules "${config}" "$@")
        [[ -n ${nproc} ]] || nproc=${modules}
        [[ ${nproc} == "${modules}" ]] ||
            die "pipeline mode runs one process per module: --nproc ${nproc} but local.modules = ${modules}"
        [[ ${modules} -ge 2 ]] ||
            die "${config} has local.modules = 1: nothing to pipeline; use --mode ddp or python -m pipeline.train"
        ;;
    ddp)
        [[ -n ${nproc} ]] || die "--mode ddp needs --nproc N (the number of data-parallel processes)"
        ;;
    *) die "--mode must be pipeline or ddp (got '${mode}')" ;;
esac
require_int --nproc "${nproc}"

show_and_run "${TORCHRUN}" --standalone --nproc-per-node "${nproc}" \
    -m pipeline.train --config "${config}" --set "run.mode=${mode}" "$@"
