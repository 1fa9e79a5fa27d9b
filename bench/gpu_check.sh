#!/usr/bin/env bash
# Every GPU number bench/RESULTS.md asks for in issue 22, and the GPU tests, on one H100/H200, in two commands of
# under 10 minutes each (estimated, not yet timed: no GPU was lent when this was written).
#
#   bash bench/gpu_check.sh wheels   # here, once: the packages the device image lacks, as Python 3.12 wheels in .whl/
#   bash bench/gpu_check.sh infer    # there: GPU tests, then bench/infer.py (scoring, 32- and 256-token generation)
#   bash bench/gpu_check.sh train    # there: bench/train.py's sweep and a full fine-tune
#
# With the device tool: run(command="bash bench/gpu_check.sh infer", carry=[".whl"], timeout_s=600), then the same
# with `train`. Each writes its whole output to $OUT/gpu_check_<part>.log (card, driver, versions, commands, tables).
set -euo pipefail
cd "$(dirname "$0")/.."
part=${1:?usage: bench/gpu_check.sh wheels|infer|train}

# Not in the device image (KINDS.md), or there in another version: medlava's pins from constraints.txt.
WHEELS="transformers==5.23.0 peft==0.21.2 liger-kernel==0.8.5 pydantic==2.14.3 pydantic-core==2.50.4
        annotated-types==0.8.0 typing-inspection==0.4.5"
if [ "$part" = wheels ]; then
    exclude=$(git rev-parse --git-path info/exclude)
    grep -qx '/.whl/' "$exclude" || echo '/.whl/' >> "$exclude"
    # shellcheck disable=SC2086
    python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
        --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
        -d .whl $WHEELS
    du -sh .whl
    exit
fi

log=${OUT:-/tmp}/gpu_check_$part.log
exec > >(tee "$log") 2>&1
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
export PYTHONPATH=$PWD/pkg:/tmp/site PYTHONUNBUFFERED=1 MEDLAVA_CACHE=/tmp/medlava-cache
nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv
python3 - <<'EOF'
import importlib.metadata as md, platform, torch
print("python", platform.python_version(), "| torch", torch.__version__, "cuda", torch.version.cuda, "|",
      " ".join(f"{p} {md.version(p)}" for p in ("transformers", "peft", "liger-kernel", "triton")),
      "| flash-attn:", next((f"{p} {md.version(p)}" for p in ("flash-attn", "flash-attn-4")
                             if any(d.metadata["Name"] == p for d in md.distributions())), "none"))
EOF
step() {  # a failing step is reported, and the next still runs
    echo; echo "\$ $*"
    local start=$SECONDS
    "$@" || echo "(exit $?)"
    echo "($((SECONDS - start)) s)"
}

if [ "$part" = infer ]; then
    step python3 -m pytest -q -m gpu -p no:cacheprovider tests/test_batching.py tests/test_kernels.py
    step python3 bench/infer.py --preset llava-med-v1.5 --device cuda --score-batch-sizes 16,32,64 \
        --n 64 --n-single 8 --n-report 32 --repeats 2
elif [ "$part" = train ]; then
    step python3 bench/train.py --preset llava-med-v1.5 --steps 6 --batch-size 8 --sweep --full --full-layers 16
else
    echo "unknown part $part: wheels, infer or train" >&2
    exit 2
fi
