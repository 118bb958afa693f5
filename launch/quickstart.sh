#!/usr/bin/env bash
# The quick start: Fashion-MNIST (the embedded default), ResNet-32 in K=4 modules with ContSup R1E
# context, one epoch, sequential in this one process. Outputs in runs/quickstart/.
set -euo pipefail

usage() {
    cat <<'USAGE'
usage: launch/quickstart.sh [--dry-run] [TRAIN ARGS...]

Runs, from the repository root:
  python -m pipeline.train --config configs/quickstart.toml [TRAIN ARGS...]

TRAIN ARGS go to pipeline.train unchanged, e.g. --set train.max_steps=100 or --set run.device=cpu.
The data comes from /usr/share/datasets/fashion-mnist (Debian: apt-get install dataset-fashion-mnist)
or from the folder given with --set data.root=DIR.
The same config as a 4-process pipeline: launch/single_node.sh configs/quickstart.toml
USAGE
}

# shellcheck source=SCRIPTDIR/lib.sh
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

while [[ $# -gt 0 ]]; do
    case $1 in
        -h | --help) usage; exit 0 ;;
        --dry-run) DRY_RUN=1; shift ;;
        --) shift; break ;;
        *) break ;;
    esac
done

cd "${REPO_ROOT}"
show_and_run "${PYTHON}" -m pipeline.train --config configs/quickstart.toml "$@"
