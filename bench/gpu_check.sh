#!/usr/bin/env bash
# The prepared GPU check of issue "Faster than the reference on a GPU": ONE call on the lent H100/H200,
# under 8 minutes, everything the GPU must settle, each table written to RESULTS (and bench/results/).
#   bash bench/gpu_check.sh RESULTS                 # on the GPU machine (device tool: RESULTS=$OUT)
#   bash bench/gpu_check.sh RESULTS --dry-run       # here, on the CPU, with tiny sizes (checks the script)
# Wheels the bare machine lacks go in .whl/ (git-ignored, carried by the device tool):
#   pip download --no-deps -d .whl xformers==0.0.35 nvidia-cuda-runtime-cu12 diffusers==0.42.1 webdataset braceexpand soundfile
# The pinned xformers wheel was built for torch 2.10 + CUDA 12; the machine has torch 2.11 + CUDA 13, so
# the CUDA 12 runtime wheel's lib/ goes on LD_LIBRARY_PATH for xformers._C to load. Whether its ops then
# run is what part 1 records (each op's error when not).
set -u
RESULTS=${1:?usage: bash bench/gpu_check.sh RESULTS [--dry-run]}
DRY=${2:-}
mkdir -p "$RESULTS"
export PYTHONUNBUFFERED=1
PY=${PY:-python3}
if [ -d .whl ] && ls .whl/*.whl >/dev/null 2>&1 && [ -z "$DRY" ]; then
  $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
  export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
  CUDART=$(ls -d /tmp/site/nvidia/cuda_runtime/lib 2>/dev/null)
  [ -n "$CUDART" ] && export LD_LIBRARY_PATH=$CUDART${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}
fi
run() { local limit=$1; shift; echo "=== $*"; timeout "$limit" "$@" || echo "!!! failed ($?): $*"; }
if [ -n "$DRY" ]; then  # the same steps at toy sizes on the CPU, reports into RESULTS only
  export BENCH_RESULTS=$RESULTS
  DEV="--device cpu --dtype fp32"; TOK="--tokens 64 128 --batch 2 --iters 2 --warmup 1"
  STEP="--preset cpu --iters 2 --warmup 1"; FLOPS="--dim 64 --heads 4 --depth-dual 1 --depth-single 1 --tokens 64 --ctx 8 --batch 1 --iters 2"
  LAT="--samples 32 --rounds 2 --image-size 32 --pixel-size 16 --pixel-patch 4"; XF="--tokens 64 --iters 2"
  TESTS="tests/test_compile.py"; LIGHT="--device cpu --preset cpu --steps 2 --warmup 1 --rounds 1"
else
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$RESULTS/gpu.txt"
  DEV="--device cuda --dtype bf16"; TOK="--heads 16 --tokens 1024 4096 --batch 4 --iters 20 --warmup 3"
  STEP="--preset gpu --iters 20"; FLOPS="--dim 2048 --heads 16 --depth-dual 6 --depth-single 8 --tokens 4096 --ctx 256 --batch 4 --iters 10 --peak-tflops 989 --compile --profile 25"
  LAT="--image-size 256 --samples 512 --encode-batch 32 --pixel-size 128 --pixel-patch 4 --dim 1024 --heads 16 --batch 64"; XF="--tokens 1024 --iters 10"
  TESTS="tests/test_attention.py tests/test_blocks.py tests/test_backbone.py tests/test_compile.py tests/test_host_syncs.py"
  LIGHT="--device cuda --preset gpu --compile --steps 10 --warmup 3 --rounds 2 --peak-tflops 989"
fi
# 1. xformers for real: what it says about itself, and one call per fMHA op (errors recorded)
run 60 $PY -m xformers.info > "$RESULTS/xformers-info.txt" 2>&1 || true
run 60 $PY bench/xformers_ops.py $DEV $XF
# 2. the CUDA-only tests (xformers and varlen flash vs math, fullgraph compile, one sync per step), then the attention table
run 120 $PY -m pytest -q -p no:cacheprovider $TESTS 2>&1 | tail -n 15 | tee "$RESULTS/tests.txt"
run 60 $PY bench/attention_backends.py $DEV $TOK
# 3. step time vs diffusers: both compiled (the bar), then both eager; peak memory in the tables
run 150 $PY bench/step_vs_diffusers.py $DEV $STEP --compile --peer-compile
run 60 $PY bench/step_vs_diffusers.py $DEV $STEP
# 4. MFU at ~1.4B parameters, 4096 + 256 tokens, compiled, with the profile of where the rest goes
run 120 $PY bench/flops.py $DEV $FLOPS
# 5. the product path on the GPU: encode throughput, cached-latent step vs pixels, the loader
run 60 $PY bench/latents.py $DEV $LAT
# last: a whole Lightning fit of the 330M model, compiled (the product path vs the bare step, item 4)
run 120 $PY bench/lightning_step.py $LIGHT
[ -z "$DRY" ] && cp bench/results/*-cuda.md "$RESULTS"/ 2>/dev/null
ls "$RESULTS"
