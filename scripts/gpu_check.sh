#!/usr/bin/env bash
# What a session with a lent CUDA machine runs, in one call: the CUDA tests, then the GPU rows of the
# benchmark suite (benchmarks/bench_gpu.py). Results in OUT_DIR: tests.log, bench.log, gpu.json.
#
#   bash scripts/gpu_check.sh OUT_DIR [bench_gpu arguments...]
#
# The golden tests need ../shared/golden beside the repository, as everywhere. No install step: the
# repository is put on PYTHONPATH and the machine's own torch / transformers are used; wheels in .whl/ (e.g. the
# serve extra's fastapi / uvicorn / pydantic for tests/chat/test_cuda_serving.py, on a machine without a package
# index) are unpacked into a temporary site directory first.
set -uo pipefail
out=${1:-runs/gpu}
shift || true
mkdir -p "$out"
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH} HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1
export KIMIVL_CPU_KERNELS=0  # the CPU-side comparisons need no C++ build here
if compgen -G ".whl/*.whl" > /dev/null; then
    site=$(mktemp -d)
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target "$site" .whl/*.whl &&
        export PYTHONPATH=$site:$PYTHONPATH
fi
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
python3 -c 'import torch, transformers; print("torch", torch.__version__, "cuda", torch.version.cuda,
"transformers", transformers.__version__)'
timeout "${TEST_TIMEOUT:-240}" python3 -m pytest -q -p no:cacheprovider tests/test_cuda.py \
    tests/ops/test_attention.py tests/ops/test_rms_norm.py tests/vision/test_moonvit_parity.py \
    tests/generation/test_cuda_graph.py tests/generation/test_cache.py tests/training/test_cuda_training.py \
    tests/chat/test_cuda_serving.py \
    2>&1 | tee "$out/tests.log" | tail -n 30
timeout "${BENCH_TIMEOUT:-360}" python3 -m benchmarks.bench_gpu --out "$out/gpu.json" "$@" > "$out/bench.log" 2>&1
echo "bench rc=$?"
tail -n 4 "$out/bench.log"
