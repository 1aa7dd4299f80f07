#!/usr/bin/env bash
# One-shot GPU check of accelerate_configs/fsdp.yaml with the Qwen2.5-0.5B shapes.
#
# Trains configs/qwen2.5-0.5b.json (vocabulary kept at 151936 through --config_overrides, so
# the embedding and lm_head have the real 0.5B shapes) from scratch for GPU_CHECK_STEPS steps
# at sequence length 2048 in bf16, launched as
#   accelerate launch --config_file accelerate_configs/fsdp.yaml --num_processes 1 bench/bench_pretrain_train.py --timed_run ...
# on a generated corpus with a tokenizer trained on it (no internet needed), then prints the
# steady-state tokens/s and the model FLOPs utilisation (MFU):
#   FLOPs per token = 6 N + 12 L d T   (PaLM appendix B: N parameters, L layers, d hidden size,
#                                       T sequence length; attention counted without causal savings)
#   MFU = tokens/s x FLOPs per token / peak, peak = 989 TFLOP/s (H100/H200 SXM bf16 dense;
#         set GPU_CHECK_PEAK_TFLOPS for another card).
# Usage, from the repository root, on one GPU (about 2-3 minutes):
#   bash bench/gpu_fsdp_check.sh
# Everything small it produces (log, throughput.json, trainer_state.json, summary) goes to
# $OUT when OUT is set, else to the run folder it prints. The 2 GB model stays in a temporary
# folder (GPU_CHECK_WORK, default: a new folder under /tmp) and is deleted at the end.
# CPU rehearsal of the same path with the tiny model (no bf16, a few steps):
#   GPU_CHECK_TINY=1 bash bench/gpu_fsdp_check.sh
set -euo pipefail
cd "$(dirname "$0")/.."

STEPS=${GPU_CHECK_STEPS:-40}
BATCH=${GPU_CHECK_BATCH:-4}             # per-device windows per micro-batch
ACCUM=${GPU_CHECK_ACCUM:-2}             # micro-batches per step: 4 x 2 x 2048 = 16384 tokens per step
BLOCK=2048
CONFIG=configs/qwen2.5-0.5b.json
OVERRIDES=vocab_size=151936
PRECISION=(--bf16)
LAUNCH=(--mixed_precision bf16)
CORPUS_MB=6
if [[ "${GPU_CHECK_TINY:-0}" == "1" ]]; then
  STEPS=${GPU_CHECK_STEPS:-8}; BATCH=2; ACCUM=1; BLOCK=128; CONFIG=configs/tiny.json; OVERRIDES=vocab_size=4096
  PRECISION=(); LAUNCH=(--mixed_precision no); CORPUS_MB=0.5
fi

WORK=${GPU_CHECK_WORK:-$(mktemp -d /tmp/gpu_fsdp_check.XXXXXX)}
REPORT=${OUT:-$WORK/report}
mkdir -p "$WORK" "$REPORT"
LOG="$REPORT/gpu_fsdp_check.log"
trap 'rm -rf "$WORK/run"' EXIT
exec > >(tee "$LOG") 2>&1

echo "== gpu_fsdp_check: config $CONFIG ($OVERRIDES), block $BLOCK, batch $BATCH x accum $ACCUM, $STEPS steps"
[[ "${GPU_CHECK_TINY:-0}" == "1" ]] || python - <<'PY' || true  # versions, for the GPU log
import torch, transformers, accelerate
print("torch", torch.__version__, "transformers", transformers.__version__, "accelerate", accelerate.__version__)
print("device:", torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu (no GPU)")
PY

# A generated English-like corpus (no download needed on the device).
python bench/english_like_corpus.py "$WORK/corpus.txt" "$CORPUS_MB"

START=$(date +%s)
STATUS=0
accelerate launch --config_file accelerate_configs/fsdp.yaml --num_processes 1 "${LAUNCH[@]}" \
  bench/bench_pretrain_train.py --timed_run \
  --config_name "$CONFIG" --config_overrides "$OVERRIDES" \
  --train_tokenizer --vocab_size 4096 --tokenizer_files "$WORK/corpus.txt" \
  --train_file "$WORK/corpus.txt" --block_size "$BLOCK" \
  --output_dir "$WORK/run" --cache_dir "$WORK/cache" \
  --max_steps "$STEPS" --per_device_train_batch_size "$BATCH" --gradient_accumulation_steps "$ACCUM" \
  --learning_rate 3e-4 --warmup_steps 5 --logging_steps 1 --save_strategy no --report_to none \
  --dataloader_num_workers 2 --seed 0 "${PRECISION[@]}" || STATUS=$?
echo "== training command finished in $(( $(date +%s) - START )) s with exit status $STATUS"

# The timings are written right after training, so they are reported even if saving failed.
cp "$WORK/run/throughput.json" "$WORK/run/data_stats.json" "$REPORT/"
cp "$WORK/run/trainer_state.json" "$REPORT/" 2>/dev/null || echo "(no trainer_state.json: the run stopped before the end)"
python - "$WORK/run" "$REPORT" "$CONFIG" <<'PY'
import json, os, sys
from pathlib import Path
run, report = Path(sys.argv[1]), Path(sys.argv[2])
throughput = json.loads((run / "throughput.json").read_text())
config = json.loads(Path(sys.argv[3]).read_text())  # the architecture file: layers and hidden size
stats = json.loads((run / "data_stats.json").read_text())
layers, hidden = config["num_hidden_layers"], config["hidden_size"]
seq = stats["block_size"]
params = stats["parameters"]  # the tied embedding counted once: it is the lm_head matmul
flops_per_token = 6 * params + 12 * layers * hidden * seq
tokens_per_second = throughput["steady_tokens_per_second"]
peak = float(os.environ.get("GPU_CHECK_PEAK_TFLOPS", "989")) * 1e12
summary = {
    "device": throughput.get("device", "cpu"),
    "parameters": params,
    "vocab_size": stats["config_overrides"].get("vocab_size", config["vocab_size"]),
    "sequence_length": seq,
    "tokens_per_step": throughput["tokens_per_step"],
    "steps_timed": throughput["steps_timed"] - throughput["warmup_steps"],
    "steady_tokens_per_second": round(tokens_per_second, 1),
    "flops_per_token": flops_per_token,
    "achieved_tflops": round(tokens_per_second * flops_per_token / 1e12, 2),
    "peak_tflops": peak / 1e12,
    "mfu": tokens_per_second * flops_per_token / peak,
    "max_memory_allocated_gib": round(throughput.get("max_memory_allocated_gib", 0.0), 2),
    "final_loss": (
        [e["loss"] for e in json.loads((run / "trainer_state.json").read_text())["log_history"] if "loss" in e][-1]
        if (run / "trainer_state.json").is_file() else None
    ),
    "document_attention_check": stats["document_attention"],
    "world_size": stats["world_size"],
    "distributed_type": stats["distributed_type"],  # FSDP on the GPU; accelerate ignores FSDP on CPU
}
(report / "gpu_fsdp_check_summary.json").write_text(json.dumps(summary, indent=2) + "\n")
print("== summary")
print(json.dumps(summary, indent=2))
print(f"RESULT tokens/s {tokens_per_second:,.0f}  MFU {100 * summary['mfu']:.1f}%  on {summary['device']}")
PY
exit "$STATUS"
