#!/bin/bash
# The convnet's first GPU run, in one command (<= 8 minutes on one GPU), everything in OUT:
#   machine.txt     nvidia-smi, jax and its devices
#   tests.txt       the conv and estimator tests (tests/test_cifar_conv.py, test_common.py)
#                   run on the GPU (float64, tiny networks)
#   gpu_check.txt   train-step speed at batch 256 for hEP exact + lambda 15 and N = 2, each
#   gpu_check.json  with the free phase in float32 and bfloat16; the bf16/f32 gradient
#                   cosine; peak GPU memory; Table 2's projected wall time (tools/gpu_check.py)
#
#   tools/gpu_check.sh OUT               # needs jax with CUDA: pip install -U "jax[cuda12]"
#   tools/gpu_check.sh OUT --cpu_smoke   # the same steps on CPU, a tiny network, one test
set -u -o pipefail
out=${1:?usage: tools/gpu_check.sh OUT [--cpu_smoke]}
smoke=${2:-}
cd "$(dirname "$0")/.."
mkdir -p "$out"
export XLA_PYTHON_CLIENT_PREALLOCATE=false  # several test processes share the GPU
status=0

{ date -u; nvidia-smi 2>&1 || echo 'no nvidia-smi'
  python -c 'import jax; print("jax", jax.__version__, jax.devices())'; } > "$out/machine.txt" 2>&1

if [ "$smoke" = --cpu_smoke ]; then
  tests=(tests/test_cifar_conv.py -k plain_convolution)
else
  tests=(-n 4 tests/test_cifar_conv.py tests/test_common.py)
fi
timeout 300 python -m pytest -q -p no:cacheprovider "${tests[@]}" > "$out/tests.txt" 2>&1 \
  || { echo "tests failed or timed out: see $out/tests.txt"; status=1; }
tail -1 "$out/tests.txt"

timeout 360 python tools/gpu_check.py --out="$out" ${smoke:+"$smoke"} 2>&1 \
  | grep -v "Unable to initialize backend" | tee "$out/gpu_check.txt" || status=1
exit $status
