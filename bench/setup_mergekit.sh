#!/usr/bin/env bash
# The reference merger in its own venv (it pins its own dependency ranges; never a project
# dependency). CPU torch first, or pip pulls a multi-GB CUDA build.
#
#   bash bench/setup_mergekit.sh            # -> /opt/mergekit-venv/bin/mergekit-yaml
#   MERGEKIT_VENV=/tmp/mk bash bench/setup_mergekit.sh
set -euo pipefail
VENV=${MERGEKIT_VENV:-/opt/mergekit-venv}
python -m venv "$VENV"
"$VENV/bin/pip" install -q torch==2.13.0
"$VENV/bin/pip" install -q mergekit==0.1.5
"$VENV/bin/mergekit-yaml" --help > /dev/null && echo "mergekit ready: $VENV/bin/mergekit-yaml"
