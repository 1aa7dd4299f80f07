#!/usr/bin/env bash
# The training levers, measured on one GPU through run_pretrain.py itself (one prepared sweep, <= 8 minutes
# on one H100/H200).
#
# Every configuration trains configs/qwen2.5-0.5b.json (vocab_size=151936: the real 0.5B embedding and
# lm_head) from scratch at sequence length 2048 in bf16 for BENCH_STEPS steps, on a generated corpus with a
# tokenizer trained on it once (no internet needed), under its own time limit. Swept, when available:
#   attention   sdpa (B rows, dense per-document mask), flex_attention (B rows, block mask),
#               flash_attention_2 (one flattened row + cu_seq_lens, if flash_attn imports),
#               kernels-community/flash-attn (if the `kernels` package loads it offline);
#   Liger       --use_liger_kernel (if liger_kernel imports; a wheel under .whl/ is installed offline);
#   compile     --torch_compile;
#   micro-batch per-device windows per step (gradient accumulation 1);
#   launch      accelerate_configs/single_gpu.yaml (plain) vs accelerate_configs/fsdp.yaml --num_processes 1.
# A configuration that fails or runs out of time is reported and the sweep goes on; one whose time limit
# would end after BENCH_BUDGET_S seconds (460, counted from the start, corpus and tokenizer included) is
# reported as skipped, so the sweep ends within 8 minutes.
#
# Printed per configuration: tokens/s (throughput.json of bench/bench_pretrain_train.py --timed_run, which
# runs run_pretrain.py with a timing callback; steady state after 5 warm-up steps), MFU, peak GPU memory, and the document-isolation check the run made on its own kernel and
# layout before training (data_stats.json: max logit change of a document when the other documents of
# its micro-batch change; packed vs alone).
#
# MFU = tokens/s x F / peak, peak = 989 TFLOP/s (H100/H200 SXM dense bf16; BENCH_PEAK_TFLOPS to change),
# with F the model FLOPs of one trained token (forward + backward = 3 x forward):
#   F = 6 N + 12 n_layers d_attn k
#   * 6 N: every weight multiplies once per token forward (2 FLOPs) and twice backward; N counts the tied
#     embedding once, which is the lm_head matmul (the embedding lookup itself costs nothing).
#   * attention: per layer and query, q.k over its keys and the weighted sum of values cost 2 d_attn
#     FLOPs each per key (d_attn = heads x head_dim = 896 here; GQA shares keys, not these FLOPs), so
#     4 d_attn k forward, 12 d_attn k with backward, k = the number of keys the token attends to.
#     Causal attention inside documents: a token at position p of its document attends to p + 1 keys,
#     so k = mean(p + 1) over the trained tokens (throughput.json's attended_keys_per_token),
#     i.e. per window 12 n_layers d_attn sum_docs len (len + 1) / 2 = 6 n_layers d_attn sum_docs len^2
#     (+ linear term). PaLM's 12 n_layers d T counts every window as one full T x T attention: 2T/(T+1)
#     times the causal single-document count and far more than the per-document count; the dense sdpa
#     mask does compute all T x T scores, but only the attended ones are useful work and count here.
#
# Usage, from the repository root, on one GPU:
#   bash bench/gpu_train_bench.sh
# Small outputs (log, one JSON line per configuration, the table) go to $OUT when set, else to the report
# folder it prints; models are written to BENCH_WORK (default: a new folder under /tmp) and deleted.
# CPU rehearsal of the same path (tiny model, sdpa only, float32, a few steps, about 2 minutes here):
#   BENCH_TINY=1 bash bench/gpu_train_bench.sh
set -uo pipefail
cd "$(dirname "$0")/.."

STEPS=${BENCH_STEPS:-20}
BLOCK=2048
CONFIG=configs/qwen2.5-0.5b.json
OVERRIDES=vocab_size=151936
PRECISION=(--bf16)
MIXED=bf16
CORPUS_MB=8
LIMIT_S=${BENCH_CONFIG_LIMIT_S:-70}          # per configuration; compiled ones get 2x
BUDGET_S=${BENCH_BUDGET_S:-460}              # a configuration starts only if its limit ends before this
TINY=${BENCH_TINY:-0}
if [[ "$TINY" == "1" ]]; then
  STEPS=${BENCH_STEPS:-7}; BLOCK=128; CONFIG=configs/tiny.json; OVERRIDES=vocab_size=4096
  PRECISION=(); MIXED=no; CORPUS_MB=0.4; LIMIT_S=${BENCH_CONFIG_LIMIT_S:-60}; BUDGET_S=${BENCH_BUDGET_S:-900}
fi

WORK=${BENCH_WORK:-$(mktemp -d /tmp/gpu_train_bench.XXXXXX)}
REPORT=${OUT:-$WORK/report}
mkdir -p "$WORK" "$REPORT"
RESULTS="$REPORT/gpu_train_bench.jsonl"
: >"$RESULTS"
exec > >(tee "$REPORT/gpu_train_bench.log") 2>&1
trap 'rm -rf "$WORK/runs"' EXIT
T0=$(date +%s)

echo "== gpu_train_bench: $CONFIG ($OVERRIDES), block $BLOCK, $STEPS steps per configuration, work $WORK"
python - <<'PY'
import torch, transformers, accelerate
print("torch", torch.__version__, "transformers", transformers.__version__, "accelerate", accelerate.__version__)
print("device:", torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu (no GPU)")
PY

# Optional packages: what imports here, or a liger wheel carried under .whl/ (the device has no registry).
if ! python -c "import liger_kernel" 2>/dev/null && compgen -G ".whl/liger_kernel-*.whl" >/dev/null; then
  pip install --quiet --no-index --no-deps --target "$WORK/pylib" .whl/liger_kernel-*.whl \
    && export PYTHONPATH="$WORK/pylib${PYTHONPATH:+:$PYTHONPATH}"
fi
have() { python -c "$1" >/dev/null 2>&1 && echo 1 || echo 0; }
HAVE_FLASH=$(have "import flash_attn")
HAVE_LIGER=$(have "import liger_kernel")
HAVE_HUB_FLASH=$(HF_HUB_OFFLINE=1 have "from kernels import get_kernel; get_kernel('kernels-community/flash-attn')")
if [[ "$TINY" == "1" ]]; then HAVE_FLASH=0; HAVE_LIGER=0; HAVE_HUB_FLASH=0; fi  # CPU: sdpa only
echo "== available: flash_attn $HAVE_FLASH, liger_kernel $HAVE_LIGER, hub flash kernel (offline) $HAVE_HUB_FLASH"

# A generated English-like corpus (no download needed on the device) and one tokenizer for every configuration.
python bench/english_like_corpus.py "$WORK/corpus.txt" "$CORPUS_MB"
python - "$WORK/corpus.txt" "$WORK/tokenizer" <<'PY' || exit 1
import sys
from pathlib import Path
sys.path.insert(0, ".")
import run_pretrain
run_pretrain.train_tokenizer([Path(sys.argv[1])], 4096, show_progress=False).save_pretrained(sys.argv[2])
PY

# name | launch (plain|fsdp) | attention | micro-batch | extra flags. In order of interest: if the budget
# runs out, the last ones are skipped.
CONFIGS=()
add() { CONFIGS+=("$1|$2|$3|$4|${5:-}"); }
if [[ "$TINY" == "1" ]]; then
  add sdpa-b2 plain sdpa 2                     # (the FSDP launch is rehearsed by gpu_fsdp_check.sh's test)
  add sdpa-b2-flattened plain sdpa 2 "--batch_layout flattened"
  add flex-b2 plain flex_attention 2           # refused on CPU: the failure is reported, the sweep goes on
else
  add sdpa-b4-fsdp fsdp sdpa 4                 # the measured row of docs/benchmarks.md (FSDP, one process)
  add sdpa-b4 plain sdpa 4
  add sdpa-b8 plain sdpa 8
  [[ $HAVE_FLASH == 1 ]] && add fa2-b8 plain flash_attention_2 8
  [[ $HAVE_FLASH == 1 ]] && add fa2-b8-compile plain flash_attention_2 8 "--torch_compile"
  [[ $HAVE_FLASH == 1 && $HAVE_LIGER == 1 ]] && add fa2-b16-liger plain flash_attention_2 16 "--use_liger_kernel"
  [[ $HAVE_FLASH == 1 && $HAVE_LIGER == 1 ]] && add fa2-b16-liger-compile plain flash_attention_2 16 "--use_liger_kernel --torch_compile"
  [[ $HAVE_FLASH == 1 ]] && add fa2-b8-fsdp fsdp flash_attention_2 8
  add flex-b8 plain flex_attention 8
  add flex-b8-compile plain flex_attention 8 "--torch_compile"
  [[ $HAVE_LIGER == 1 ]] && add sdpa-b8-liger plain sdpa 8 "--use_liger_kernel"
  [[ $HAVE_HUB_FLASH == 1 ]] && add hubfa-b8 plain kernels-community/flash-attn 8
  # run_cpt.py: add its configurations here (same shapes, same launch) once its BridgePackingCollator
  # builds batches with train_common.packed_batch; its goal is tokens/s within 3% of run_pretrain's.
fi

for entry in "${CONFIGS[@]}"; do
  IFS='|' read -r NAME LAUNCH ATTN BATCH EXTRA <<<"$entry"
  LIMIT=$LIMIT_S; [[ "$EXTRA" == *--torch_compile* ]] && LIMIT=$(( 2 * LIMIT_S ))
  ELAPSED=$(( $(date +%s) - T0 ))
  if (( ELAPSED + LIMIT > BUDGET_S )); then  # it could not finish inside the sweep's budget
    echo "== $NAME: skipped (sweep at ${ELAPSED} s, its limit ${LIMIT} s, budget ${BUDGET_S} s)"
    printf '{"name": "%s", "status": "skipped: time budget"}\n' "$NAME" >>"$RESULTS"
    continue
  fi
  if [[ "$LAUNCH" == fsdp ]]; then YAML=(--config_file accelerate_configs/fsdp.yaml --num_processes 1)
  else YAML=(--config_file accelerate_configs/single_gpu.yaml); fi
  RUN="$WORK/runs/$NAME"
  echo "== $NAME: $LAUNCH, $ATTN, micro-batch $BATCH ${EXTRA:+($EXTRA) }limit ${LIMIT} s"
  START=$(date +%s)
  # shellcheck disable=SC2086  # EXTRA holds several flags
  timeout --signal=TERM --kill-after=15 "$LIMIT" accelerate launch "${YAML[@]}" --mixed_precision "$MIXED" \
    bench/bench_pretrain_train.py --timed_run --config_name "$CONFIG" --config_overrides "$OVERRIDES" --tokenizer_name "$WORK/tokenizer" \
    --train_file "$WORK/corpus.txt" --cache_dir "$WORK/cache" --block_size "$BLOCK" --output_dir "$RUN" \
    --attn_implementation "$ATTN" --per_device_train_batch_size "$BATCH" --max_steps "$STEPS" \
    --learning_rate 3e-4 --warmup_steps 5 --logging_steps 5 --save_strategy no --report_to none \
    --dataloader_num_workers 2 --disable_tqdm true --log_level warning --seed 0 "${PRECISION[@]}" $EXTRA \
    >"$WORK/$NAME.log" 2>&1
  STATUS=$?
  tail -n 3 "$WORK/$NAME.log" | sed 's/^/   | /'
  python - "$RUN" "$CONFIG" "$NAME" "$STATUS" "$(( $(date +%s) - START ))" "$LAUNCH $ATTN b$BATCH $EXTRA" \
    "$WORK/$NAME.log" >>"$RESULTS" <<'PY'
import json, os, sys
from pathlib import Path
run, config_path, name, status, seconds, setting, log = sys.argv[1:8]
row = {"name": name, "setting": setting.strip(), "exit_status": int(status), "seconds": int(seconds)}
stats_path, throughput_path = Path(run) / "data_stats.json", Path(run) / "throughput.json"
if stats_path.is_file():
    stats = json.loads(stats_path.read_text())
    row["isolation"] = stats["document_attention"]
if throughput_path.is_file():
    throughput, config = json.loads(throughput_path.read_text()), json.loads(Path(config_path).read_text())
    d_attn = config["num_attention_heads"] * config.get("head_dim", config["hidden_size"] // config["num_attention_heads"])
    keys = throughput["attended_keys_per_token"]
    flops_per_token = 6 * stats["parameters"] + 12 * config["num_hidden_layers"] * d_attn * keys
    tokens_per_second = throughput.get("steady_tokens_per_second", 0.0)
    peak = float(os.environ.get("BENCH_PEAK_TFLOPS", "989")) * 1e12
    row.update(
        status="ok" if int(status) == 0 else "trained, then failed",
        device=throughput.get("device", "cpu"),
        tokens_per_second=round(tokens_per_second, 1),
        flops_per_token=flops_per_token,
        parameters=stats["parameters"],
        attended_keys_per_token=keys,
        mfu=tokens_per_second * flops_per_token / peak,
        max_memory_allocated_gib=round(throughput.get("max_memory_allocated_gib", 0.0), 2),
        steps_timed=throughput["steps_timed"] - throughput["warmup_steps"],
    )
else:
    reason = "time limit" if int(status) in (124, 137) else "error"
    lines = [line for line in Path(log).read_text(errors="replace").splitlines() if line.strip()]
    own = [line for line in lines if ".py: error: " in line]  # the script's one-line refusal
    raised = [line for line in lines if "Error" in line.split(":")[0] and "CalledProcessError" not in line]
    row.update(status=f"failed ({reason})", last_line=(own or raised or lines or [""])[-1][-300:])
print(json.dumps(row))
PY
  rm -rf "$RUN"
done

python - "$RESULTS" "$REPORT/gpu_train_bench_table.md" <<'PY'
import json, sys
rows = [json.loads(line) for line in open(sys.argv[1])]
lines = ["| configuration | tokens/s | MFU | peak memory GiB | isolation (other docs changed / packed vs alone, layout) | status |",
         "|---|---|---|---|---|---|"]
for r in rows:
    iso = r.get("isolation") or {}
    check = (f"{iso['max_logit_diff_other_documents_changed']:.1e} / {iso['max_logit_diff_packed_vs_alone']:.1e}, "
             f"{iso['layout']}, {iso.get('compute_dtype', '')}" if "max_logit_diff_packed_vs_alone" in iso else "-")
    tps = f"{r['tokens_per_second']:,.0f}" if "tokens_per_second" in r else "-"
    mfu = f"{100 * r['mfu']:.1f}%" if "mfu" in r else "-"
    mem = f"{r['max_memory_allocated_gib']:.1f}" if "max_memory_allocated_gib" in r else "-"
    status = r["status"] + (f": {r['last_line']}" if r.get("last_line") else "")
    lines.append(f"| {r['name']} ({r.get('setting', '')}) | {tps} | {mfu} | {mem} | {check} | {status} |")
table = "\n".join(lines)
open(sys.argv[2], "w").write(table + "\n")
print("== results (MFU = tokens/s x (6N + 12 n_layers d_attn k) / peak; k = attended keys per token)")
print(table)
ok = [r for r in rows if r.get("status") == "ok"]
if ok:
    best = max(ok, key=lambda r: r["tokens_per_second"])
    print(f"BEST {best['name']}: {best['tokens_per_second']:,.0f} tokens/s, MFU {100 * best['mfu']:.1f}%")
PY
echo "== sweep finished in $(( $(date +%s) - T0 )) s; results in $REPORT"
