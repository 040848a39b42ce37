#!/usr/bin/env bash
# The GPU measurements BENCHMARKS.md still lacks, one stage per device call (each well inside 10 minutes):
#
#   bash scripts/gpu_session.sh compile [PRECISION]  # issue 16: compiled step as CUDA graphs, batch 8, Faster
#                                                    # R-CNN and YOLO (default 16-mixed; bf16-mixed has no scaler)
#   bash scripts/gpu_session.sh eager     # issue 16: eager re-measure after the sync fixes, with torchvision
#   bash scripts/gpu_session.sh tests     # tests/test_cuda.py: the device path checked on the GPU (make test-gpu)
#   bash scripts/gpu_session.sh views     # issue 17: SimCLR views on the device (BCCD images when ../shared is absent)
#
# Run from the repository root on the device machine with the wheels of .whl/ carried (see BENCHMARKS.md); each
# stage writes its markdown table and log under $OUT (default /tmp/gpu_out).
set -u
OUT=${OUT:-/tmp/gpu_out}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
if ! python3 -c "import hydra, albumentations, pycocotools" 2>/dev/null; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
        || exit 1
    export PYTHONPATH=/tmp/site
fi
python3 -m pip install -q --no-deps --no-build-isolation -e . || exit 1
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader > "$OUT/device.txt"
python3 -c "import torch, torchvision; print('torch', torch.__version__, 'torchvision', torchvision.__version__)" \
    >> "$OUT/device.txt"

case "${1:-}" in
compile)
    timeout 540 python3 scripts/bench_gpu.py --impls detkit,yolo --precisions "${2:-16-mixed}" --batches 8 \
        --compile --compile-mode reduce-overhead --skip-nms > "$OUT/compile.md" 2> "$OUT/compile.log" ;;
eager)
    timeout 540 python3 scripts/bench_gpu.py --batches 8 --precisions 32-true,16-mixed \
        > "$OUT/eager.md" 2> "$OUT/eager.log" ;;
tests)
    timeout 540 python3 -m pytest -q -m gpu tests/test_cuda.py -p no:cacheprovider > "$OUT/tests.log" 2>&1 ;;
views)
    timeout 540 python3 scripts/bench_simclr_views.py --batch 512 > "$OUT/views.md" 2> "$OUT/views.log" ;;
*)
    echo "usage: bash scripts/gpu_session.sh compile|eager|tests|views" >&2
    exit 2 ;;
esac
