#!/usr/bin/env bash
# The work a session with a lent GPU machine has to do, in steps that each fit one 10-minute command.
#
#   benchmarks/gpu_session.sh wheels   # here, before the first GPU call: SpikingJelly, loguru and snnTorch
#                                      # as wheels in .whl/ and .whl-legacy/ (.gitignore'd); carry them
#   benchmarks/gpu_session.sh tests    # there: every GPU test (CuPy kernels, fused neuron, CUDA graphs)
#   benchmarks/gpu_session.sh legacy   # there: SpikingJelly 0.0.0.0.14 (its own .whl-legacy/, carried too):
#                                      # models built with backend='cupy' on CUDA, under the wrapper
#   benchmarks/gpu_session.sh grid     # there: benchmarks/gpu.py, repeat until it reports every cell
#   benchmarks/gpu_session.sh graphs   # there: the online methods again with cuda_graphs=True
#
# grid and graphs fuse the multi-step neurons on CUDA (SLR_FUSED_CUDA=1, the path the GPU targets are
# about); SLR_FUSED_CUDA=0 in the environment gives the stepped path's figures instead.
# Each step on the GPU machine writes its log and JSON under $OUT when that is set (the device tool's
# output folder), so they come back even when the command is stopped at its limit.
set -uo pipefail
cd "$(dirname "$0")/.."
step=${1:-}
out=${OUT:-/tmp/slr-gpu}
mkdir -p "$out"

carried() {  # carried() FOLDER TARGET: its wheels, installed beside the image's own torch/CuPy/Triton/pluggy
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$2" "$1"/*.whl \
    || exit 1
  export PYTHONPATH=$2:$PWD PYTHONUNBUFFERED=1
}

site() {
  carried .whl /tmp/site
  export SLR_FUSED_CUDA=${SLR_FUSED_CUDA:-1}
  python3 - <<'EOF'
import torch, cupy, spikingjelly, snntorch
print("torch", torch.__version__, "cuda", torch.cuda.is_available(), torch.cuda.get_device_name(0) if torch.cuda.is_available() else "",
      "| cupy", cupy.__version__, "| snntorch", snntorch.__version__)
EOF
}

case "$step" in
  wheels)
    python3 -m pip download -q --no-deps --only-binary=:all: -d .whl spikingjelly==2.0.0 loguru snntorch==1.0.0
    python3 -m pip download -q --no-deps --only-binary=:all: -d .whl-legacy spikingjelly==0.0.0.0.14
    ls -l .whl .whl-legacy
    ;;
  tests)
    site
    python3 -m pytest -q -p no:cacheprovider -rs tests/test_sltt_cuda.py tests/test_sltt_multistep.py \
      tests/test_graphs.py tests/test_sj_legacy.py -k "cupy or cuda or gpu" 2>&1 | tee "$out/gpu_tests.log"
    ;;
  legacy)
    carried .whl-legacy /tmp/site-legacy
    python3 -m pytest -q -p no:cacheprovider -rs tests/test_sj_legacy.py 2>&1 | tee "$out/gpu_legacy.log"
    ;;
  grid)
    site
    python3 benchmarks/gpu.py --resume --allow-errors --out benchmarks/results/gpu.json 2>&1 | tee "$out/gpu_grid.log"
    cp benchmarks/results/gpu.json benchmarks/results/gpu.png "$out/" 2>/dev/null
    ;;
  graphs)
    site
    python3 benchmarks/gpu.py --resume --allow-errors --cuda-graphs \
      --methods sj_bptt sltt_c1 sltt_c2 sltt_c5 sltt_auto sltt_k2 \
      --out benchmarks/results/gpu_graphs.json 2>&1 | tee "$out/gpu_graphs.log"
    cp benchmarks/results/gpu_graphs.json benchmarks/results/gpu_graphs.png "$out/" 2>/dev/null
    ;;
  *)
    sed -n 2,15p "$0"
    exit 2
    ;;
esac
