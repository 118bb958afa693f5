#!/usr/bin/env bash
# The quick start: Fashion-MNIST (the default data set, Debian's dataset-fashion-mnist), ResNet-32
# in K=4 modules with ContSup R1E context, one epoch, sequential in this one process. Outputs in
# runs/quickstart/.
set -euo pipefail

usage() {
    cat <<'USAGE'
usage: launch/quickstart.sh [--dry-run] [--set KEY=VALUE ...]

Runs, from the repository root:
  python -m pipeline.train --config configs/quickstart.toml [--set ...]

--set KEY=VALUE goes to pipeline.train, e.g. --set train.max_steps=100 or --set run.device=cpu.
--dry-run prints the command and exits; options may come in any order; after -- everything goes
to pipeline.train.
The data comes from /usr/share/datasets/fashion-mnist (Debian: apt-get install dataset-fashion-mnist)
or from the folder given with --set data.root=DIR.
The same config as a 4-process pipeline: launch/single_node.sh configs/quickstart.toml
USAGE
}

# shellcheck source=SCRIPTDIR/lib.sh
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

train_args=()
while [[ $# -gt 0 ]]; do
    case $1 in
        -h | --help) usage; exit 0 ;;
        --dry-run) DRY_RUN=1 ;;
        --set) need_value "$@"; train_args+=("$1" "$2"); shift ;;
        --set=*) train_args+=("$1") ;;
        --) shift; train_args+=("$@"); break ;;
        -*) usage >&2; die "unknown option $1" ;;
        *) die "unexpected argument '$1': the config is configs/quickstart.toml; change it with --set KEY=VALUE" ;;
    esac
    shift
done

cd "${REPO_ROOT}"
show_and_run "${PYTHON}" -m pipeline.train --config configs/quickstart.toml "${train_args[@]}"
