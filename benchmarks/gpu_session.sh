#!/usr/bin/env bash
# The work a session with a lent GPU machine has to do. A session gets 15 minutes of device time, the
# machine's start included, so everything runs as one command of under 9 minutes:
#
#   benchmarks/gpu_session.sh wheels   # here, before the GPU call: SpikingJelly, loguru and snnTorch as
#                                      # wheels in .whl/ and .whl-legacy/ (.gitignore'd); carry both
#   benchmarks/gpu_session.sh all      # there (device run, timeout_s 600): grid, neuron, tests, graphs,
#                                      # legacy in that order, each under its own time limit; logs and
#                                      # JSON in $OUT
#
# or one part at a time:
#   benchmarks/gpu_session.sh grid     # benchmarks/gpu.py, every cell in one process (--in-process)
#   benchmarks/gpu_session.sh neuron   # benchmarks/neuron_speed.py: one neuron layer, SJ's kernel vs ours
#   benchmarks/gpu_session.sh tests    # every GPU test (CuPy kernels, fused neuron, CUDA graphs)
#   benchmarks/gpu_session.sh graphs   # the online methods again with cuda_graphs=True
#   benchmarks/gpu_session.sh legacy   # SpikingJelly 0.0.0.0.14 (.whl-legacy/): backend='cupy' models on CUDA
#   benchmarks/gpu_session.sh multistep  # issue 5 on the GPU: benchmarks/multistep.py --device cuda (not in
#                                        # 'all', whose parts fill one call: a second call, ~2 min)
#
# grid and graphs fuse the multi-step neurons on CUDA (SLR_FUSED_CUDA=1, the path the GPU targets are
# about); SLR_FUSED_CUDA=0 in the environment gives the stepped path's figures instead. At most 8 files
# come back from $OUT: all writes exactly 8 (4 logs, 3 JSON, the grid's PNG).
# There this checkout runs from PYTHONPATH, not installed: a dry run here must use a python3 that has the
# dependencies but not this project's editable install (tests/test_packaging.py checks that case), or it
# cannot show what the machine lacks.
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
import importlib.util, torch, spikingjelly, snntorch
cupy = importlib.util.find_spec("cupy") and __import__("cupy")
print("torch", torch.__version__, "cuda", torch.cuda.is_available(), torch.cuda.get_device_name(0) if torch.cuda.is_available() else "",
      "| cupy", cupy.__version__ if cupy else "missing", "| snntorch", snntorch.__version__)
EOF
}

# each part: LIMIT seconds at most (0: none); the JSON is rewritten after every cell, so a part stopped at
# its limit still returns what it measured
limit() { if [ "${1:-0}" -gt 0 ]; then echo "timeout -k 5 $1"; fi; }

# SLR_GRID_ARGS: more options for both gpu.py runs; SLR_NEURON_ARGS replaces neuron_speed.py's (a dry run
# of 'all' on a CPU: SLR_GRID_ARGS="--quick --device cpu" SLR_NEURON_ARGS="--Ts 4 --rounds 2")
grid() {
  $(limit "${1:-0}") python3 benchmarks/gpu.py --in-process --resume --allow-errors --timed 5 ${SLR_GRID_ARGS:-} \
    --out "$out/gpu.json" 2>&1 | tee "$out/gpu_grid.log"
}

neuron() {  # one neuron layer: SpikingJelly's CUDA/Triton LIF against the fused CuPy kernels
  $(limit "${1:-0}") python3 benchmarks/neuron_speed.py ${SLR_NEURON_ARGS:---device cuda --shape 64 128 24 24} \
    --out "$out/neuron_speed.json" 2>&1 | tee -a "$out/gpu_grid.log"
}

tests() {
  $(limit "${1:-0}") python3 -m pytest -v -p no:cacheprovider -rs --durations=10 tests/test_sltt_cuda.py \
    tests/test_sltt_multistep.py tests/test_graphs.py tests/test_sj_legacy.py -k "cupy or cuda or gpu" 2>&1 \
    | tee "$out/gpu_tests.log"
}

graphs() {
  $(limit "${1:-0}") python3 benchmarks/gpu.py --in-process --resume --allow-errors --timed 5 --cuda-graphs ${SLR_GRID_ARGS:-} \
    --methods sj_bptt sltt_c1 sltt_c2 sltt_c5 sltt_auto sltt_k2 sltt_c1_plain \
    --out "$out/gpu_graphs.json" 2>&1 | tee "$out/gpu_graphs.log"
  rm -f "$out/gpu_graphs.png"  # at most 8 files come back; gpu.py --plot-only redraws it from the JSON
}

multistep() {  # zero-change fused SLTT vs SpikingJelly's BPTT (its default CUDA LIF and its torch one)
  $(limit "${1:-0}") python3 benchmarks/multistep.py --device cuda --batch-size 32 --Ts 10,20 --batches 5 \
    --idle-wait 0 --methods bptt,bptt_torch,sltt_fused,sltt_steps,sltt_online ${SLR_MULTISTEP_ARGS:-} \
    --out "$out/multistep_gpu.json" 2>&1 | tee "$out/multistep_gpu.log"
}
legacy() {
  ( carried .whl-legacy /tmp/site-legacy
    $(limit "${1:-0}") python3 -m pytest -q -p no:cacheprovider -rs tests/test_sj_legacy.py 2>&1 \
      | tee "$out/gpu_legacy.log" )
}

case "$step" in
  wheels)
    python3 -m pip download -q --no-deps --only-binary=:all: -d .whl spikingjelly==2.0.0 loguru snntorch==1.0.0
    python3 -m pip download -q --no-deps --only-binary=:all: -d .whl-legacy spikingjelly==0.0.0.0.14
    ls -l .whl .whl-legacy
    ;;
  all)
    start=$SECONDS
    site
    grid 220; echo "grid done at $((SECONDS - start)) s"
    neuron 40; echo "neuron done at $((SECONDS - start)) s"
    tests 150; echo "tests done at $((SECONDS - start)) s"
    graphs 90; echo "graphs done at $((SECONDS - start)) s"
    legacy 45; echo "legacy done at $((SECONDS - start)) s"
    ;;
  grid|neuron|tests|graphs|multistep)
    site
    "$step"
    ;;
  legacy)
    legacy
    ;;
  *)
    sed -n 2,20p "$0"
    exit 2
    ;;
esac
