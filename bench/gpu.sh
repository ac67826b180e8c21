#!/usr/bin/env bash
# The GPU benchmark on a bare GPU machine that has Python 3.12 with torch, transformers and
# onnx but no network: install the wheels brought along, make tokenwire importable, point
# ONNX Runtime at the CUDA 13 libraries the torch install ships, run bench/gpu.py.
#
#   bench/gpu.sh OUT_DIR [bench/gpu.py flags]
#
# Wheels it expects (bench/gpu_wheels.sh fetches them where pip reaches the registry, for cp312
# manylinux x86_64):
#   .whl/*.whl     onnxruntime-genai-cuda 0.18.0, grpcio 1.85.3, grpcio-health-checking,
#                  grpcio-reflection, grpcio-status, protobuf 7.36, googleapis-common-protos,
#                  structlog 26.1, prometheus-client 0.26, onnx-ir 1.1.0, opentelemetry-api and
#                  -sdk 1.45.2, opentelemetry-semantic-conventions 0.66b2
#   onnxruntime-gpu 1.31.1 as .whl/onnxruntime_gpu-*.whl, or as the parts of a tar.xz of its
#   unpacked wheel in .gpu*/ortgpu.tar.xz.part* (too large to move in one piece).
set -euo pipefail
cd "$(dirname "$0")/.."
out=${1:?usage: bench/gpu.sh OUT_DIR [bench/gpu.py flags]}
shift
site=/tmp/tokenwire-site
mkdir -p "$site" "$out"
if compgen -G ".gpu*/ortgpu.tar.xz.part*" >/dev/null; then
    cat .gpu*/ortgpu.tar.xz.part* | tar xJf - -C "$site"  # the glob sorts the parts in order
fi
python3 -m pip install -q --no-index --no-deps --no-compile --upgrade --target "$site" .whl/*.whl
# tokenwire's import names point at the repository's folders (as `make typecheck` does).
tree=/tmp/tokenwire-tree/tokenwire
mkdir -p "$tree"
ln -sfn "$PWD/service" "$tree/server"
ln -sfn "$PWD/clients" "$tree/client"
ln -sfn "$PWD/clients/edge" "$tree/edge"
ln -sfn "$PWD/common" "$tree/common"
ln -sfn "$PWD/protos/tokenwire/v1" "$tree/v1"
export PYTHONPATH="$site:/tmp/tokenwire-tree"
# CUDA 13 runtime, cuBLAS, cuDNN, cuFFT, cuRAND, NVRTC from the nvidia-* packages beside torch.
nvidia=$(python3 -c 'import nvidia, os; print(os.path.dirname(list(nvidia.__path__)[0]))')/nvidia
export LD_LIBRARY_PATH="$(find "$nvidia" -maxdepth 3 -name lib -type d | tr '\n' ':')${LD_LIBRARY_PATH:-}"
python3 -c 'import onnxruntime as o, onnxruntime_genai as g; print("onnxruntime", o.__version__, o.get_available_providers(), "genai", g.__version__)'
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader || true
PYTHONUNBUFFERED=1 python3 bench/gpu.py --out "$out/gpu.json" "$@" 2>&1 | tee "$out/gpu.log"
