#!/usr/bin/env bash
# Fused-loss benchmark on one CUDA GPU at Qwen2.5-0.5B shapes (vocab 151936, hidden 896), bf16.
#
# Runs benchmarks/bench_divergence.py's fused cases (ours: AB and JSD; TRL's chunked JSD and KL;
# Liger's fused JSD when liger-kernel is installed; the naive materialised AB formula) at 4096 and
# 16384 tokens, each case in its own process, and prints peak extra GPU memory and
# forward+backward time. Takes 2-4 minutes on an H100; every run is capped at RUN_TIMEOUT seconds.
#
#   benchmarks/gpu_check.sh                 # uses .venv/bin/python, or $PYTHON
#   PYTHON=python3 benchmarks/gpu_check.sh --repeats 10
#
# Extra arguments go to every bench_divergence.py run.
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.."
PYTHON="${PYTHON:-.venv/bin/python}"
RUN_TIMEOUT="${RUN_TIMEOUT:-150}"

if ! command -v "$PYTHON" >/dev/null 2>&1 && [[ ! -x "$PYTHON" ]]; then
    echo "gpu_check: no Python at '$PYTHON'; run 'make setup' or set PYTHON=..." >&2
    exit 1
fi

"$PYTHON" - <<'EOF'
import sys

import torch

if not torch.cuda.is_available():
    sys.exit(
        "gpu_check: torch.cuda.is_available() is False (torch "
        f"{torch.__version__}). Run this on a CUDA machine with a CUDA build of torch."
    )
properties = torch.cuda.get_device_properties(0)
print(
    f"gpu_check: {properties.name}, {properties.total_memory / 2**30:.0f} GiB, "
    f"torch {torch.__version__}, CUDA {torch.version.cuda}"
)
EOF

CASES=(fused_naive_ab fused_ours_ab fused_ours_jsd fused_trl_jsd fused_ours_fkl fused_trl_kl)
if "$PYTHON" -c "import liger_kernel" >/dev/null 2>&1; then
    CASES+=(fused_liger_jsd)
else
    echo "gpu_check: liger-kernel is not installed, skipping its case" \
        "(pip install -c constraints.txt -e '.[bench]')."
fi

for TOKENS in 4096 16384; do
    echo
    timeout "$RUN_TIMEOUT" "$PYTHON" benchmarks/bench_divergence.py \
        --device cuda --dtype bfloat16 --tokens "$TOKENS" --vocab 151936 --hidden 896 \
        --warmup 2 --repeats 5 --cases "${CASES[@]}" "$@"
done
