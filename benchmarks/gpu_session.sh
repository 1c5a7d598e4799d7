#!/usr/bin/env bash
# One prepared run for a lent GPU machine (issue #5): the CUDA tests and the GPU benchmarks, each
# under its own time limit, every result written under $OUT. Run from the repository root:
#
#   here:   bash benchmarks/fetch_wheels.sh          # wheels/ and device_shared/ (ignored by git)
#   device: bash benchmarks/gpu_session.sh           # carry: ["wheels", "device_shared"]
#
# The device has PyTorch and CUDA but no package index: our other dependencies come from wheels/.
# Nothing here changes the GPU's settings. Total budget about 8 minutes of device time.
set -u
OUT="${OUT:-/tmp/gpu_session}"
mkdir -p "$OUT"
rm -f "$OUT/summary.txt"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
if [ -d device_shared ]; then     # ../shared does not travel to the device: the carried copy
    export TRAINER_REFS="$PWD/device_shared/refs" TRAINER_SEEDS="$PWD/device_shared/seeds"
fi
PY="${PYTHON:-python3}"

step() {   # step NAME SECONDS COMMAND...: run, keep output and exit status
    local name="$1" limit="$2"; shift 2
    local t0=$(date +%s)
    timeout "$limit" "$@" > "$OUT/$name.txt" 2>&1
    local rc=$?
    echo "$name rc=$rc $(( $(date +%s) - t0 ))s" | tee -a "$OUT/summary.txt"
}

{ nvidia-smi; "$PY" -c "import sys, torch; print(sys.version); print(torch.__version__, \
torch.version.cuda, torch.cuda.get_device_name(0))"; } > "$OUT/machine.txt" 2>&1
if [ -d wheels ]; then
    "$PY" -m pip install --quiet --no-index --find-links wheels click protobuf lmdb tqdm \
        pillow > "$OUT/pip.txt" 2>&1
fi
"$PY" -c "import torchvision" 2>/dev/null && echo "torchvision present" >> "$OUT/machine.txt"

step test_cuda 240 "$PY" -m pytest -p no:cacheprovider -x -rs tests/test_cuda.py
step bench_lenet 40 "$PY" benchmarks/lenet.py --device cuda
step bench_resnet_block 40 "$PY" benchmarks/resnet_block.py --device cuda
step bench_ssd_plate 60 "$PY" benchmarks/ssd_plate.py --device cuda
step bench_resnet50_fp32 60 "$PY" benchmarks/resnet50.py --device cuda
step bench_resnet50_bf16 60 "$PY" benchmarks/resnet50.py --device cuda --amp bf16
step bench_memory 40 "$PY" benchmarks/memory.py --device cuda
