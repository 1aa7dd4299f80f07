#!/usr/bin/env bash
# GPU check of run_eval.py: the parity tests on the device (batched scores against the paper's one-sentence
# loop on built-in questions and on all 2,940 released items, float32 and bfloat16 with --loss_dtype model,
# the latter bit-identical), then the benchmark: float32 weights, where the batched path must reach
# --min_ratio 50 times the loop's items/s with the same predictions, and bfloat16 weights with both loss
# dtypes (--loss_dtype model asserted bit-identical to the loop, its ties counted). A few minutes on one GPU.
# Run from the repository root with ../shared/data/paper-culture-cloze present. Without a GPU it runs the same
# checks on the CPU, with the benchmark on 20 items per file and no ratio target (the 50x is a GPU figure).
set -euo pipefail
export TOKENIZERS_PARALLELISM=false TQDM_DISABLE=1
if command -v nvidia-smi >/dev/null && nvidia-smi >/dev/null 2>&1; then
    nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
    device=cuda
    bench=(--device cuda --batch_size 256)
    target=(--min_ratio 50)
else
    echo "no GPU: the checks run on the CPU"
    device=cpu
    bench=(--device cpu --max_items 20)
    target=()
fi
RUN_EVAL_TEST_DEVICE=$device python -m pytest -q tests/test_run_eval.py tests/e2e/test_run_eval.py -k "paper_loop" -p no:cacheprovider
python bench/bench_eval.py "${bench[@]}" --dtype float32 --loss_dtypes float32 "${target[@]}"
python bench/bench_eval.py "${bench[@]}" --dtype bfloat16 --loss_dtypes float32 model
