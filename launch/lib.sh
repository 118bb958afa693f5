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

# config_modules MODE CONFIG [TRAIN ARGS...]: validate the config exactly as the job will read it
# (pipeline.train --check on the same arguments) and print its local.modules. A bad config ends
# the script here with pipeline.train's one-line error and exit 2, before torchrun starts
# processes that would each print it, followed by torchrun's traceback.
config_modules() {
    local mode=$1 config=$2 resolved
    shift 2
    resolved=$("${PYTHON}" -m pipeline.train --check --config "${config}" --set "run.mode=${mode}" "$@") || exit $?
    resolved=$(grep '^local\.modules = ' <<<"${resolved}")
    echo "${resolved#local.modules = }"
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
