#!/usr/bin/env bash
# What bench/gpu.sh installs on a bare GPU machine (Python 3.12, no network), fetched here:
# the wheels into .whl/, and onnxruntime-gpu (255 MB as a wheel) unpacked, compressed and cut
# into parts that each travel beside the working tree (64 MiB a call, the tree included), one
# part a folder: .gpu-aa/ortgpu.tar.xz.partaa, .gpu-ab/ortgpu.tar.xz.partab, ...
#
#   bench/gpu_wheels.sh            (after `make install`: versions are those of .venv)
#
# It prints the device calls that bring them over: first .whl, then one part a call (a warm
# machine keeps what earlier calls carried), then bench/gpu.sh, which joins the parts.
set -euo pipefail
cd "$(dirname "$0")/.."
py=.venv/bin/python
version() { "$py" -c "import importlib.metadata as m; print(m.version('$1'))"; }
download() {
    "$py" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 \
        --implementation cp --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 \
        --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
        --platform manylinux1_x86_64 -d "$@"
}
# The service's own dependencies at the versions it is tested with here, and GenAI's CUDA build.
service=(grpcio grpcio-health-checking grpcio-reflection grpcio-status protobuf
    googleapis-common-protos structlog prometheus-client opentelemetry-api opentelemetry-sdk
    opentelemetry-semantic-conventions)
pins=()
for name in "${service[@]}"; do pins+=("$name==$(version "$name")"); done
rm -rf .whl .gpu-*
download .whl "${pins[@]}" onnx-ir==1.1.0 onnxruntime-genai-cuda==0.18.0
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
download "$work" "onnxruntime-gpu==$(version onnxruntime-gpu)"
mkdir "$work/site"
"$py" -m zipfile -e "$work"/onnxruntime_gpu-*.whl "$work/site"
tree_bytes=$(git ls-files -z | xargs -0 du -cb | tail -1 | cut -f1)
part_mib=$(((64 * 1024 * 1024 - tree_bytes) / 1024 / 1024 - 2))
whl_mib=$(du -sm .whl | cut -f1)
if ((whl_mib > part_mib)); then
    echo ".whl is $whl_mib MiB: more than the $part_mib MiB that travel beside the tree" >&2
    exit 1
fi
tar cf - -C "$work/site" . | xz -T0 -6 | split -b "${part_mib}M" - "$work/ortgpu.tar.xz.part"
for part in "$work"/ortgpu.tar.xz.part*; do
    folder=.gpu-${part##*.part}
    mkdir "$folder"
    mv "$part" "$folder/"
done
echo "tree $((tree_bytes / 1024 / 1024)) MiB; .whl $whl_mib MiB; parts of at most $part_mib MiB:"
ls -d .gpu-*
echo "device calls: run(command='true', carry=['.whl']); then for each folder F above,"
echo "run(command='true', carry=[F]); then run(command='bench/gpu.sh \$OUT', timeout_s=600)"
