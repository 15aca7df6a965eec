#!/usr/bin/env bash
# Every GPU benchmark of BENCHMARKS.md in one go (run on the lent H100/H200 through the device tool).
#   bash bench/gpu_suite.sh A|B   -> results in bench/results/*-cuda.md (and $OUT when set)
# Part A: attention backends, step vs diffusers, packing, FLOPs/MFU. Part B: compile/memory, input pipeline.
set -u
export PYTHONUNBUFFERED=1
if [ -d .whl ]; then  # wheels the bare machine lacks (xformers, diffusers, webdataset, soundfile)
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    && export PYTHONPATH=/tmp/site
fi
PY=${PY:-python3}
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
$PY -c "import torch, xformers.ops as x; print('torch', torch.__version__, 'xformers', x.__name__, torch.cuda.get_device_name())"
run() { echo "=== $*"; timeout "$1" "${@:2}" || echo "!!! failed ($?): ${*:2}"; }
case "${1:-A}" in
T)  # the CUDA-only tests (xformers, varlen flash) and the backbone tests on the GPU, then the packed paths
  run 300 $PY -m pytest -q -p no:cacheprovider tests/test_attention.py tests/test_backbone.py tests/test_blocks.py
  run 120 $PY bench/attention_backends.py --device cuda --dtype bf16 --heads 16 --tokens 1024 4096 --batch 4 --iters 20 --warmup 3
  run 120 $PY bench/packing.py --device cuda --dtype bf16 --dim 1024 --heads 16 --depth-dual 4 --depth-single 4 --samples 16 --iters 20 --warmup 3
  ;;
C)  # packing at a wider model, then ours with MMDiTConfig.compile vs the peer, eager and compiled
  run 120 $PY bench/packing.py --device cuda --dtype bf16 --dim 2048 --heads 16 --depth-dual 4 --depth-single 4 --samples 32 --iters 10 --warmup 2
  run 240 $PY bench/step_vs_diffusers.py --device cuda --dtype bf16 --preset gpu --iters 20 --compile
  run 300 $PY bench/step_vs_diffusers.py --device cuda --dtype bf16 --preset gpu --iters 20 --compile --peer-compile
  run 240 $PY bench/flops.py --device cuda --dtype bf16 --dim 2048 --heads 16 --depth-dual 6 --depth-single 8 \
      --tokens 4096 --ctx 256 --batch 4 --iters 10 --peak-tflops 989 --compile
  ;;
A)
  run 120 $PY bench/attention_backends.py --device cuda --dtype bf16 --heads 16 --tokens 1024 4096 --batch 4 --iters 20 --warmup 3
  run 150 $PY bench/step_vs_diffusers.py --device cuda --dtype bf16 --preset gpu --iters 20
  run 120 $PY bench/packing.py --device cuda --dtype bf16 --dim 1024 --heads 16 --depth-dual 4 --depth-single 4 --samples 16 --iters 20 --warmup 3
  run 150 $PY bench/flops.py --device cuda --dtype bf16 --dim 2048 --heads 16 --depth-dual 6 --depth-single 8 \
      --tokens 4096 --ctx 256 --batch 4 --iters 10 --peak-tflops 989
  ;;
B)
  run 150 $PY bench/input_pipeline.py --device cuda
  run 240 $PY bench/compile_memory.py --device cuda --dtype bf16 --backend inductor --dim 1024 --heads 16 --depth 8 \
      --batch 8 --tokens 1024 --iters 10 --compile-step --quick
  ;;
esac
if [ -n "${OUT:-}" ]; then cp bench/results/*-cuda.md "$OUT"/ 2>/dev/null; fi
ls bench/results
