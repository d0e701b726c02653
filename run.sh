#!/usr/bin/env bash
# One-stop entry point from a clean clone: sets up what is missing, then runs.
#   ./run.sh demo [ARGS]   the demo (Fashion-MNIST, small CNN, forget one class, ssd / lfssd / assd vs retrain)
#   ./run.sh test [ARGS]   the whole test suite
#   ./run.sh excise ARGS   any excise command inside the project's environment
set -euo pipefail
cd "$(dirname "$0")"
VENV="${EXCISE_VENV:-.venv}"

setup() {
  if ! ls /usr/share/datasets/fashion-mnist/train-images-idx3-ubyte* >/dev/null 2>&1 && [ -z "${EXCISE_FASHION_MNIST_ROOT:-}" ]; then
    echo "[run.sh] installing the Debian package dataset-fashion-mnist" >&2
    SUDO=""; [ "$(id -u)" -ne 0 ] && SUDO="sudo"
    $SUDO apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq dataset-fashion-mnist >/dev/null
  fi
  if [ ! -x "$VENV/bin/python" ]; then
    echo "[run.sh] creating the virtual environment $VENV" >&2
    python3 -m venv "$VENV"
  fi
  if ! "$VENV/bin/python" -c "import torch, excise, pytest, matplotlib, backpack, optuna, tomli_w, filelock, platformdirs, diffusers" >/dev/null 2>&1; then
    echo "[run.sh] installing torch==2.13.0, excise (plots, test, tune, diffusion extras) and BackPACK" >&2
    "$VENV/bin/pip" install -q --disable-pip-version-check torch==2.13.0
    "$VENV/bin/pip" install -q --disable-pip-version-check -e ".[plots,test,tune,diffusion]"
    # BackPACK without its declared torchvision dependency, which would replace this torch build
    "$VENV/bin/pip" install -q --disable-pip-version-check --no-deps "backpack-for-pytorch>=1.6,<2" "unfoldNd<1" einops
  fi
}

cmd="${1:-}"; shift || true
case "$cmd" in
  demo) setup; exec "$VENV/bin/excise" demo "$@" ;;
  test) setup; exec "$VENV/bin/python" -m pytest "$@" ;;
  excise) setup; exec "$VENV/bin/excise" "$@" ;;
  *) echo "usage: ./run.sh demo|test|excise [ARGS]" >&2; exit 2 ;;
esac
