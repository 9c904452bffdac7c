#!/usr/bin/env bash
# The GPU checks of issue 4, section 4, as one short run on a lent CUDA machine (the `device` tool):
#   run(command="bash bench/gpu_check.sh", timeout_s=540)
# That machine's image has torch (CUDA), transformers, safetensors, tokenizers, jinja2, typer, rich and
# pytest, which is all this needs (HF folders only); nothing can be installed there. For GGUF runs, carry
# gguf as a wheel: once, here, `echo /.whl/ >> .git/info/exclude; python3 -m pip download --no-deps
# --only-binary=:all: --python-version 3.12 --implementation cp --platform manylinux2014_x86_64 -d .whl
# gguf==0.19.0`, then run with carry=[".whl"]: wheels in .whl are installed first.
# It runs the gpu-marked tests, then the harness's --gpu table (ownllm and transformers in bfloat16 on
# the 1B and SmolLM2 shapes, built there: ~1 min), and leaves the logs, the JSON and RESULTS.md in $OUT.
set -uo pipefail
OUT=${OUT:-/tmp/gpu-out}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site .whl/*.whl || exit 1
  export PYTHONPATH=/tmp/site:$PWD
else
  export PYTHONPATH=$PWD
fi
python3 -c "import torch; print('torch', torch.__version__, torch.cuda.get_device_name())" | tee "$OUT/device.txt"
timeout 180 python3 -m pytest -q -p no:cacheprovider -m gpu tests/test_gpu.py 2>&1 | tee "$OUT/gpu-tests.log"
timeout 300 python3 bench/harness.py --gpu --models llama-3.2-1b,smollm2-135m --json "$OUT/gpu.json" 2>&1 | tee "$OUT/harness.log"
cp bench/RESULTS.md "$OUT/"
