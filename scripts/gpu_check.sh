#!/usr/bin/env bash
# The prepared GPU check: one command on a single lent GPU, under 8 minutes, nothing from the network.
#
#     bash scripts/gpu_check.sh [WHEELS_DIR] [gpu_check.py options]
#
# Prints one table (scripts/gpu_check.py: dpo, tvkd (cached), tdpo and dckd, packed and padded,
# BasicTrainer and FSDPTrainer with NCCL at world size 1, bf16, tokens/s, peak GPU memory, MFU, at
# 1,024 and 4,096 tokens) and the tiny model's bf16 losses against the CPU's fp32 ones, then PASS
# or FAIL (the exit status). Without a GPU it runs the same steps on the CPU at a reduced size and
# says so. The GPU image lacks omegaconf (and its antlr4 runtime): they are installed from
# WHEELS_DIR (default: wheels/), prepared where the package index is reachable with
#     pip download --no-deps --only-binary=:all: --python-version 3.12 \
#         --platform manylinux_2_17_x86_64 -d wheels omegaconf==2.3.1 antlr4-python3-runtime==4.9.3
set -euo pipefail
cd "$(dirname "$0")/.."
if [ "${1:-}" = "-h" ] || [ "${1:-}" = "--help" ]; then  # this header, then gpu_check.py's options
    sed -n '2,13p' "$0" | sed 's/^# \{0,1\}//'
    exec python scripts/gpu_check.py --help
fi
wheels="${1:-wheels}"
[ $# -gt 0 ] && shift
if ! python -c "import omegaconf" 2>/dev/null; then
    if ! ls "$wheels"/*.whl > /dev/null 2>&1; then
        echo "gpu_check: omegaconf is not installed and $wheels/ holds no wheels (see the top of $0)" >&2
        exit 2
    fi
    pip install -q --no-index --no-deps "$wheels"/*.whl
fi
# one thread per core is the default; the CPU fallback keeps the machine's own setting
exec python scripts/gpu_check.py "$@"
