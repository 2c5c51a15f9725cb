#!/usr/bin/env bash
# The figures and numbers of README "Choosing alpha and beta", on the offline demo.
#
# 1. `abkd-sweep` on the demo with its default budget (12 trials of 300 steps, TPE, median
#    pruning): trials.csv, heatmap.png, best.yaml; the wall time is printed.
# 2. A demo student distilled for 300 steps of 32 sequences with forward KL (`abkd-train`), so
#    that it overlaps the teacher as a fine-tuned student would, then the mass-allocation picture
#    of AB at the paper's GPT-2 and vision settings next to forward and reverse KL on the demo's
#    test split.
# 3. Both PNGs, trials.csv and mass_allocation.json copied to docs/images/.
#
#   benchmarks/choosing_alpha_beta.sh                 # uses .venv/bin/python, or $PYTHON
#   OUT=/tmp/cab benchmarks/choosing_alpha_beta.sh
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.."
PYTHON="${PYTHON:-.venv/bin/python}"
OUT="${OUT:-choosing-alpha-beta}"
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}"

start=$(date +%s)
"$PYTHON" -m abkd_trainer.tools.sweep --output_dir "$OUT/sweep"
echo "choosing_alpha_beta: demo sweep wall time $(( $(date +%s) - start )) s," \
    "load average $(cut -d' ' -f1-3 /proc/loadavg 2>/dev/null || echo n/a)"

"$PYTHON" -m abkd_trainer --output_dir "$OUT/student" --max_steps 300 --alpha 1 --beta 0 \
    --per_device_train_batch_size 32 --rouge_l_eval false --eval_strategy no
"$PYTHON" -m abkd_trainer.tools.mass_allocation --student_model "$OUT/student" \
    --alpha 0.2 0.8 --beta 0.7 0.3 --num_prompts 200 --output_dir "$OUT/allocation" \
    --title "Demo: gradient mass after 300 forward-KL steps (teacher vs student, 200 test prompts)"

mkdir -p docs/images
cp "$OUT/sweep/heatmap.png" docs/images/demo_sweep_heatmap.png
cp "$OUT/sweep/trials.csv" docs/images/demo_sweep_trials.csv
cp "$OUT/allocation/mass_allocation.png" docs/images/demo_mass_allocation.png
cp "$OUT/allocation/mass_allocation.json" docs/images/demo_mass_allocation.json
echo "choosing_alpha_beta: figures in docs/images/, numbers in $OUT/"
