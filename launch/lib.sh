# shellcheck shell=bash
# Shared by the launch scripts (sourced, not run): command echo, --dry-run, checking a config and reading K.

# The repository root, importable without installing the package.
REPO_ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
export PYTHONPATH="${REPO_ROOT}${PYTHONPATH:+:${PYTHONPATH}}"

PYTHON=${PYTHON:-python}
TORCHRUN=${TORCHRUN:-torchrun}
DRY_RUN=${DRY_RUN:-0}

# die MESSAGE: one line on stderr, exit 2 (bad input, as pipeline.train does).
die() {
    printf 'error: %s\n' "$1" >&2
    exit 2
}

# torchrun restarts every worker this many times after a failure; each restart resumes from the newest
# complete checkpoint set in run.out_dir (docs/failures.md). MAX_RESTARTS=0: a failure ends the job.
MAX_RESTARTS=${MAX_RESTARTS:-3}
[[ ${MAX_RESTARTS} =~ ^[0-9]+$ ]] || die "MAX_RESTARTS must be a whole number >= 0 (got '${MAX_RESTARTS}')"

# show_and_run CMD...: print the exact command (shell-quoted, after '+ '), then run it unless --dry-run.
show_and_run() {
    printf '+'
    printf ' %q' "$@"
    printf '\n'
    if [[ ${DRY_RUN} == 1 ]]; then
        return 0
    fi
    "$@"
}

# need_value OPTION [VALUE...]: an option that takes a value must have one.
need_value() {
    [[ $# -ge 2 ]] || die "$1 needs a value"
}

# config_layout MODE CONFIG [TRAIN ARGS...]: validate the config exactly as the job will read it
# (pipeline.train --check on the same arguments) and print "K R OUT_DIR": its local.modules,
# pipeline.replicas (0: WORLD_SIZE / K) and run.out_dir. A bad config ends the script here with
# pipeline.train's one-line error and exit 2, before torchrun starts processes that would each
# print it, followed by torchrun's traceback. The data's folder is left to the processes that read
# it (--no-data-check): a node of a multi-node job may hold none, and they refuse a missing one at once.
config_layout() {
    local mode=$1 config=$2 resolved out_dir
    shift 2
    resolved=$("${PYTHON}" -m pipeline.train --check --no-data-check --config "${config}" --set "run.mode=${mode}" \
        "$@") || exit $?
    out_dir=$(sed -n 's/^run\.out_dir = "\(.*\)"$/\1/p' <<<"${resolved}")
    echo "$(sed -n 's/^local\.modules = //p' <<<"${resolved}") $(sed -n 's/^pipeline\.replicas = //p' <<<"${resolved}") ${out_dir}"
}

# show_and_run_job REPORT CMD...: show_and_run for a torchrun (or srun) job. When the job fails,
# torchrun prints its own report (a traceback and a summary, about 30 lines) after the processes'
# one-line errors: it goes to the file REPORT instead, and the terminal ends with where it is and
# the last process's 'error: ' line, the cause. Returns the job's exit status.
show_and_run_job() {
    local report=$1 codes
    shift
    if [[ ${DRY_RUN} == 1 ]]; then
        show_and_run "$@"
        return 0
    fi
    { show_and_run "$@" 2>&1 1>&3 3>&- | job_stderr "${report}"; codes=("${PIPESTATUS[@]}"); } 3>&1 || true
    return "${codes[0]}"
}

# job_stderr REPORT: pass a job's stderr through to ours until torchrun starts reporting a failed
# process (a line such as 'W1207 02:22:39.863000 PID .../torch/distributed/elastic/...] Sending
# process P closing signal SIGTERM' or '... failed (exitcode: 2) ...'), then keep the rest in
# REPORT. A job that failed in the end (torchrun's ChildFailedError) ends with REPORT's name and the
# last 'error: ' line seen, the attempt that ended it; one that torchrun restarted and that then
# succeeded says so and names REPORT (its later attempts' stderr is there too).
job_stderr() {
    local report=$1 line cause="" kept=0 failed=0
    local failing='^[WE][0-9]{4} .*torch/distributed/elastic/.*(closing signal|failed \(exitcode)'
    while IFS= read -r line; do
        if [[ ${kept} == 0 && ${line} =~ ${failing} ]]; then
            mkdir -p "$(dirname "${report}")" && : >"${report}" && kept=1
        fi
        if [[ ${line} == "error: "* ]]; then
            cause=${line}
        fi
        if [[ ${line} == *ChildFailedError* ]]; then
            failed=1
        fi
        if [[ ${kept} == 1 ]]; then
            printf '%s\n' "${line}" >>"${report}"
        else
            printf '%s\n' "${line}" >&2
        fi
    done
    if [[ ${kept} == 1 && ${failed} == 1 ]]; then
        printf "torchrun's report: %s\n" "${report}" >&2
        if [[ -n ${cause} ]]; then
            printf '%s\n' "${cause}" >&2
        fi
    elif [[ ${kept} == 1 ]]; then
        printf "torchrun restarted the job after a failure; its report: %s\n" "${report}" >&2
    fi
    return 0
}

# pipeline_nproc K R NNODES NPROC OPTION: the processes per node of a K x R pipeline job (one process
# per module of each of R replicas) over NNODES nodes: NPROC where given (checked), else K x R
# (R = 1 when 0) split evenly over the nodes. A mismatch ends the script naming OPTION.
pipeline_nproc() {
    local modules=$1 replicas=$2 nnodes=$3 nproc=$4 option=$5 total
    if [[ -z ${nproc} ]]; then
        total=$((modules * (replicas > 0 ? replicas : 1)))
        ((total % nnodes == 0)) ||
            die "local.modules x pipeline.replicas = ${total} processes do not split evenly over ${nnodes} nodes; set ${option} per node"
        nproc=$((total / nnodes))
    fi
    require_int "${option}" "${nproc}"
    total=$((nproc * nnodes))
    ((total % modules == 0)) ||
        die "pipeline mode runs one process per module of each replica (K x R): ${total} processes is not a multiple of local.modules = ${modules}; set ${option}"
    ((replicas == 0 || total == modules * replicas)) ||
        die "pipeline mode runs one process per module of each replica (K x R): ${total} processes but local.modules x pipeline.replicas = ${modules} x ${replicas}; set ${option}"
    echo "${nproc}"
}

# quiet_torchrun_threads: torchrun prints a banner and sets OMP_NUM_THREADS=1 on every launch where it
# is unset; the stages set their own thread counts (pipeline.threads_per_stage), so set it here, quietly.
# Only for torchrun: a sequential run in this shell keeps every core.
quiet_torchrun_threads() {
    export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
}

# require_int NAME VALUE: VALUE must be a whole number >= 1.
require_int() {
    [[ $2 =~ ^[1-9][0-9]*$ ]] || die "$1 must be a whole number >= 1 (got '$2')"
}
