# shellcheck shell=bash
# Shared by the launch scripts (sourced, not run): command echo, --dry-run, reading K from a config.

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

# config_modules CONFIG [TRAIN ARGS...]: local.modules of CONFIG after the --set overrides among
# the train args. Exits 2 with the config error when CONFIG is not valid.
config_modules() {
    "${PYTHON}" - "$@" <<'PY'
import sys

from pipeline.config import load_config
from pipeline.errors import BadInput

config, rest = sys.argv[1], sys.argv[2:]
sets = [rest[i + 1] for i in range(len(rest) - 1) if rest[i] == "--set"]
sets += [arg.split("=", 1)[1] for arg in rest if arg.startswith("--set=")]
try:
    print(load_config(config, sets).local.modules)
except BadInput as err:
    print(f"error: {err}", file=sys.stderr)
    sys.exit(2)
PY
}

# require_int NAME VALUE: VALUE must be a whole number >= 1.
require_int() {
    [[ $2 =~ ^[1-9][0-9]*$ ]] || die "$1 must be a whole number >= 1 (got '$2')"
}
