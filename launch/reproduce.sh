#!/usr/bin/env bash
# Runs every row of one table (a folder of row configs) in sequence, then collects the results
# next to the published figures with python -m pipeline.reproduce collect.
set -euo pipefail

usage() {
    cat <<'USAGE'
usage: launch/reproduce.sh [--dry-run] [--mode auto|sequential|pipeline] [--runs-dir DIR] [--skip-done]
                           TABLE [--set KEY=VALUE ...]

TABLE   a folder of row configs (configs/published/cifar10_resnet32, configs/fashion_mnist) or its
        name (cifar10_resnet32, fashion_mnist): see configs/published/ for the tables.
For each row, in table order:
  K >= 2 and >= K GPUs here (or --mode pipeline):
    torchrun --standalone --nproc-per-node K -m pipeline.train --config ROW --set run.mode=pipeline \
             --set run.out_dir=RUNS/ROW_NAME [--set ...]
  otherwise (or --mode sequential):
    python -m pipeline.train --config ROW --set run.mode=sequential --set run.out_dir=RUNS/ROW_NAME [--set ...]
then:
  python -m pipeline.reproduce collect TABLE RUNS --out RUNS/results.md

  --runs-dir DIR  where the rows write (default: runs/<TABLE's path below configs/>).
  --skip-done     skip rows whose RUNS/ROW_NAME/summary.json exists, resume a row that stopped
                  after a complete checkpoint and start over one that stopped before its first
                  (to continue an interrupted table).
  --dry-run       print every command and exit.
GPUS=N overrides the GPU count (default: torch.cuda.device_count(), so CUDA_VISIBLE_DEVICES counts). A failing row stops the table.
--set KEY=VALUE goes to every row, e.g. --set train.epochs=1 for a smoke run (marked † in the table).
Options may come in any order, before or after TABLE; after -- everything goes to pipeline.train.
USAGE
}

# shellcheck source=SCRIPTDIR/lib.sh
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

mode=auto
runs_dir=""
skip_done=0
positional=()
train_args=()
while [[ $# -gt 0 ]]; do
    case $1 in
        -h | --help) usage; exit 0 ;;
        --dry-run) DRY_RUN=1 ;;
        --mode) need_value "$@"; mode=$2; shift ;;
        --mode=*) mode=${1#*=} ;;
        --runs-dir) need_value "$@"; runs_dir=$2; shift ;;
        --runs-dir=*) runs_dir=${1#*=} ;;
        --skip-done) skip_done=1 ;;
        --set) need_value "$@"; train_args+=("$1" "$2"); shift ;;
        --set=*) train_args+=("$1") ;;
        --) shift; train_args+=("$@"); break ;;
        -*) usage >&2; die "unknown option $1" ;;
        *) positional+=("$1") ;;
    esac
    shift
done
[[ ${#positional[@]} -ge 1 ]] || { usage >&2; die "missing TABLE"; }
[[ ${#positional[@]} -eq 1 ]] || die "one TABLE expected, got: ${positional[*]} (overrides go after --set)"
table=${positional[0]}
case ${mode} in auto | sequential | pipeline) ;; *) die "--mode must be auto, sequential or pipeline (got '${mode}')" ;; esac

# TABLE as given, else a name under configs/published/ or configs/.
table_dir=""
for candidate in "${table}" "configs/published/${table}" "configs/${table}" \
    "${REPO_ROOT}/configs/published/${table}" "${REPO_ROOT}/configs/${table}"; do
    if [[ -d ${candidate} ]]; then
        table_dir=${candidate%/}
        break
    fi
done
if [[ -z ${table_dir} ]]; then
    available=$(cd "${REPO_ROOT}/configs/published" && find . -mindepth 1 -maxdepth 1 -type d -printf '%f\n' | sort | tr '\n' ' ')
    die "no table '${table}'; pass a folder of row configs or one of: ${available}fashion_mnist"
fi
if [[ -z ${runs_dir} ]]; then
    table_abs=$(cd "${table_dir}" && pwd)
    case ${table_abs} in
        "${REPO_ROOT}"/configs/*) runs_dir=runs/${table_abs#"${REPO_ROOT}"/configs/} ;;
        *) runs_dir=runs/$(basename "${table_abs}") ;;
    esac
fi

if [[ -n ${GPUS:-} ]]; then
    gpus=${GPUS}
else
    # Counted as torch counts them (CUDA_VISIBLE_DEVICES respected), not what nvidia-smi lists.
    gpus=$("${PYTHON}" -c 'import torch; print(torch.cuda.device_count())' 2>/dev/null || echo 0)
fi
[[ ${gpus} =~ ^[0-9]+$ ]] || die "GPUS must be a whole number (got '${gpus}')"

rows_text=$("${PYTHON}" -m pipeline.reproduce rows "${table_dir}")
mapfile -t rows <<<"${rows_text}"
echo "# ${table_dir}: ${#rows[@]} rows, ${gpus} GPU(s), outputs in ${runs_dir}/"

for line in "${rows[@]}"; do
    IFS=$'\t' read -r name modules config <<<"${line}"
    out_dir=${runs_dir}/${name}
    if [[ ${skip_done} == 1 && -f ${out_dir}/summary.json ]]; then
        echo "# ${name}: ${out_dir}/summary.json exists, skipped"
        continue
    fi
    again=()
    if [[ ${skip_done} == 1 ]] && compgen -G "${out_dir}/checkpoints/step_*/COMPLETE" >/dev/null; then
        again=(--set "run.resume=${out_dir}")  # an interrupted row goes on from its last complete checkpoint
    elif [[ ${skip_done} == 1 && -e ${out_dir}/metrics.jsonl ]]; then
        again=(--set run.overwrite=true)  # it stopped before its first checkpoint: it starts over
    fi
    if [[ ${modules} -ge 2 && (${mode} == pipeline || (${mode} == auto && ${gpus} -ge ${modules})) ]]; then
        # quiet_torchrun_threads for this command only: the sequential rows keep every core
        OMP_NUM_THREADS=${OMP_NUM_THREADS:-1} show_and_run "${TORCHRUN}" --standalone --nproc-per-node "${modules}" \
            -m pipeline.train --config "${config}" --set run.mode=pipeline --set "run.out_dir=${out_dir}" "${again[@]}" "${train_args[@]}"
    else
        show_and_run "${PYTHON}" -m pipeline.train --config "${config}" --set run.mode=sequential \
            --set "run.out_dir=${out_dir}" "${again[@]}" "${train_args[@]}"
    fi
done

show_and_run "${PYTHON}" -m pipeline.reproduce collect "${table_dir}" "${runs_dir}" --out "${runs_dir}/results.md"
