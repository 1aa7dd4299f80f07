#!/usr/bin/env bash
# GPU check of run_eval.py (about 3 minutes on one H100): the parity tests on the GPU, then the benchmark
# (batched scoring vs the paper's one-sentence-per-forward loop, same model and questions) in float32 and
# bfloat16. Run from the repository root with ../shared/data/paper-culture-cloze present.
set -euo pipefail
export TOKENIZERS_PARALLELISM=false TQDM_DISABLE=1
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
RUN_EVAL_TEST_DEVICE=cuda python -m pytest -q tests/test_eval.py -k "paper_loop" -p no:cacheprovider
python bench/bench_eval.py --device cuda --dtype float32 --batch_size 256
python bench/bench_eval.py --device cuda --dtype bfloat16 --batch_size 256
