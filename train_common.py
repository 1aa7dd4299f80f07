"""What the two training scripts (run_pretrain.py, run_cpt.py) share, once.

* ``use_cpu_backend_without_gpu``: a multi-process launch on a machine without a GPU trains over gloo;
* the batch layout of packed windows for each attention implementation (``packed_batch``), and the
  guard that keeps a flash kernel from ever seeing several rows without sequence boundaries;
* the document-isolation check each runs on its own model, kernel, device and layout before training
  (``check_document_isolation``, ``isolation_failure``, ``ISOLATION_TOLERANCE``);
* one resume convention (``resume_checkpoint``, ``RESUME_HELP``);
* one way to write, and push, the model card of a Trainer run (``ModelCard``, ``ModelCardMixin``,
  ``finish_training``).

Needs study_common.py beside it (``InputError``, ``write_card``).
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path

from study_common import InputError, write_card

# --------------------------------------------------------------------------------------
# Distributed training on CPU (run_pretrain.py, run_cpt.py)
# --------------------------------------------------------------------------------------


def use_cpu_backend_without_gpu() -> bool:
    """Make a multi-process launch on a machine without a GPU train over gloo on the CPU.

    ``accelerate launch --config_file accelerate_configs/cpu.yaml`` starts its processes through
    torch.distributed.run but does not pass ``use_cpu`` on; the Trainer then finds no GPU and
    trains each process alone (world size 1) beside an idle process group. Setting
    ACCELERATE_USE_CPU before the TrainingArguments are built makes it join the gloo group
    (world size = number of processes). Call it first thing in main(). Returns True when set.
    """
    import torch

    launched_distributed = int(os.environ.get("WORLD_SIZE", "1")) > 1
    if launched_distributed and not torch.cuda.is_available() and "ACCELERATE_USE_CPU" not in os.environ:
        os.environ["ACCELERATE_USE_CPU"] = "true"
        return True
    return False


# --------------------------------------------------------------------------------------
# Packed windows as a batch, per attention implementation (run_pretrain.py, run_cpt.py)
# --------------------------------------------------------------------------------------

#: Attention implementations that build the per-document causal mask from position ids that
#: restart at 0, for a batch of ANY number of rows, when there is no attention_mask and no KV cache
#: (transformers 5.24 masking_utils: ``_preprocess_mask_arguments`` -> ``find_packed_sequence_indices``).
DOCUMENT_MASK_FROM_POSITION_IDS = frozenset({"sdpa", "eager", "flex_attention"})

#: The sequence-boundary kwargs that flash kernels read (transformers 5.24: ``FlashAttentionKwargs``;
#: ``_flash_attention_forward`` takes the varlen path when all four are given, and
#: ``prepare_fa_kwargs_from_position_ids`` computes the same four from position ids). Qwen2 passes
#: them from ``Qwen2ForCausalLM.forward(**kwargs)`` through the model and every decoder layer to
#: ``Qwen2Attention.forward(**kwargs)`` and on to the attention function.
SEQUENCE_BOUNDARY_KEYS = ("cu_seq_lens_q", "cu_seq_lens_k", "max_length_q", "max_length_k")


def is_flash_attention(attn_implementation: str) -> bool:
    """True for flash kernels (flash_attention_2/3/4, hub kernels such as kernels-community/flash-attn),
    by the rule transformers itself uses (``utils.generic.is_flash_attention_requested``: "flash" in the name)."""
    return "flash" in attn_implementation


def uses_flattened_layout(attn_implementation: str) -> bool:
    """Whether packed windows go to the model as one flattened row with sequence boundaries.

    Flash kernels infer document boundaries from position ids only for a batch of ONE row
    (``modeling_flash_attention_utils._is_packed_sequence`` is False for batch_size != 1): with B
    rows and no mask they attend across documents. They, and any implementation not known to build
    the mask from position ids, get the flattened layout, which isolates documents for every kernel.
    sdpa/eager/flex_attention keep B rows: on one flattened row their dense mask would be (B*L)^2.
    """
    return attn_implementation not in DOCUMENT_MASK_FROM_POSITION_IDS


def packed_batch(input_ids, position_ids, labels, attn_implementation: str, *, flatten: bool | None = None) -> dict:
    """The model's batch for B packed windows (B x L tensors whose position ids restart at 0 at every document
    and window start; labels -100 there). No attention_mask is ever passed (it would turn the per-document
    mask off). Layouts (``flatten`` None: by ``uses_flattened_layout``):

    * padded: the three B x L tensors as they are (sdpa, eager, flex_attention);
    * flattened: the same tokens as one row of B*L, every run of restarting positions a sequence of
      transformers' ``DataCollatorWithFlattening`` (``cu_seq_lens_q/k``, ``max_length_q/k``).
    """
    if flatten is None:
        flatten = uses_flattened_layout(attn_implementation)
    if not flatten:
        batch = {"input_ids": input_ids, "position_ids": position_ids, "labels": labels}
    else:
        from transformers import DataCollatorWithFlattening

        starts = (position_ids.reshape(-1) == 0).nonzero().flatten().tolist() + [position_ids.numel()]
        tokens, targets = input_ids.reshape(-1).tolist(), labels.reshape(-1).tolist()
        sequences = [{"input_ids": tokens[a:b], "labels": targets[a:b]} for a, b in zip(starts, starts[1:])]
        batch = DataCollatorWithFlattening(return_flash_attn_kwargs=True)(sequences)
    check_flash_batch(batch, attn_implementation)
    return batch


def check_attention_implementation_trains_on(attn_implementation: str, device) -> None:
    """Refuse, before anything is read or written, a kernel that cannot train on a CPU: flex_attention
    has no backward on CPU (torch 2.13) and flash kernels need a GPU (run_pretrain.py, run_cpt.py)."""
    if device.type == "cpu" and (attn_implementation == "flex_attention" or is_flash_attention(attn_implementation)):
        why = "has no backward on CPU" if attn_implementation == "flex_attention" else "needs a GPU"
        raise InputError(
            f"--attn_implementation {attn_implementation} does not train on the CPU (the training device here): it "
            f"{why}. Use --attn_implementation sdpa (the default) or eager, or run on a GPU. Nothing was written."
        )


def autocast_dtype(training_args):
    """The dtype the Trainer computes in under mixed precision (None: float32), for the isolation checks."""
    import torch

    return torch.bfloat16 if training_args.bf16 else torch.float16 if training_args.fp16 else None


def check_flash_batch(batch: dict, attn_implementation: str) -> None:
    """The guard: a ValueError when a batch of B > 1 rows without sequence boundaries would reach a
    flash kernel, which would then attend across the documents of each row. Shapes only: no device sync."""
    tokens = batch.get("input_ids") if batch.get("input_ids") is not None else batch.get("inputs_embeds")
    rows = 0 if tokens is None else tokens.shape[0]
    missing = [key for key in SEQUENCE_BOUNDARY_KEYS if batch.get(key) is None]
    if is_flash_attention(attn_implementation) and rows > 1 and missing:
        raise ValueError(
            f"A batch of {rows} rows without {', '.join(missing)} would reach the flash kernel "
            f"{attn_implementation!r}, which infers document boundaries from position ids only for one row: "
            "it would attend across documents. Build the batch with train_common.packed_batch."
        )


def guard_flash_attention_inputs(model) -> None:
    """Run ``check_flash_batch`` on every call of ``model`` (a forward pre-hook), so that no batch,
    from whatever collator, reaches its flash kernel with several rows and no sequence boundaries."""

    def guard(module, args, kwargs):
        inputs = {"input_ids": args[0], **kwargs} if args else kwargs  # model(input_ids, ...) or model(**batch)
        check_flash_batch(inputs, module.config._attn_implementation)

    model.register_forward_pre_hook(guard, with_kwargs=True)


# --------------------------------------------------------------------------------------
# Document isolation, checked on the run's own model before training (run_pretrain.py, run_cpt.py)
# --------------------------------------------------------------------------------------

#: Largest logit difference that counts as rounding, not as attention across documents.
ISOLATION_TOLERANCE = 1e-4


def batch_layout(attn_implementation: str, flatten: bool | None = None) -> str:
    """The name of the layout ``packed_batch`` gives: "flattened" (one row) or "padded" (B rows)."""
    return "flattened" if (uses_flattened_layout(attn_implementation) if flatten is None else flatten) else "padded"


def _window_features(window) -> dict:
    """``input_ids``, ``position_ids`` (restarting at every document) and ``labels`` of a window given as
    documents of segments (token ids, each segment opening with the start token)."""
    input_ids, position_ids, labels = [], [], []
    for document in window:
        start = len(input_ids)
        for segment in document:
            tokens = [int(t) for t in segment]
            position_ids += range(len(input_ids) - start, len(input_ids) - start + len(tokens))
            input_ids += tokens
            labels += [-100, *tokens[1:]]
    return {"input_ids": input_ids, "position_ids": position_ids, "labels": labels}


def _batch_logits(model, collator, windows, autocast) -> tuple:
    """(logits of every token of the collated batch, row after row; the layout's name)."""
    import torch

    batch = collator([_window_features(window) for window in windows])
    layout = "flattened" if batch.get("cu_seq_lens_q") is not None else "padded"
    batch.pop("labels")
    batch = {k: v.to(model.device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}
    with autocast:
        logits = model(**batch, use_cache=False).logits
    return logits.float().reshape(-1, logits.shape[-1]), layout


def _isolation_diffs(model, collator, windows, autocast) -> tuple[float, float, int, str]:
    """(max logit diff packed vs alone, max diff when the other documents change, documents, layout)."""
    import torch

    generator = torch.Generator().manual_seed(0)
    vocab_size = model.config.vocab_size

    def other_tokens(segment) -> list[int]:  # the same length and start token, other tokens after it
        return [int(segment[0]), *torch.randint(2, vocab_size, (len(segment) - 1,), generator=generator).tolist()]

    packed, layout = _batch_logits(model, collator, windows, autocast)
    row_length = packed.shape[0] // len(windows)
    alone_diff = other_diff = 0.0
    spans = [(w, d) for w, window in enumerate(windows) for d in range(len(window))]
    for w, d in spans:  # document boundaries from ``windows``, not from the position ids under test
        start = w * row_length + sum(len(segment) for document in windows[w][:d] for segment in document)
        end = start + sum(len(segment) for segment in windows[w][d])
        alone = _batch_logits(model, collator, [[windows[w][d]]], autocast)[0][: end - start]
        alone_diff = max(alone_diff, float((packed[start:end] - alone).abs().max()))
        changed = [
            [doc if (i, j) == (w, d) else [other_tokens(s) for s in doc] for j, doc in enumerate(window)]
            for i, window in enumerate(windows)
        ]
        changed_logits = _batch_logits(model, collator, changed, autocast)[0]
        other_diff = max(other_diff, float((packed[start:end] - changed_logits[start:end]).abs().max()))
    return alone_diff, other_diff, len(spans), layout


def check_document_isolation(model, collator: Callable[[list[dict]], dict], windows, *, autocast_dtype=None) -> dict:
    """Does attention stay inside each document, with this model's device, kernel and batch layout?

    ``windows``: B >= 2 windows batched together, each a list of documents, each a list of segments (token
    ids, the first the start token); ``collator``: the run's training collator, run under autocast to
    ``autocast_dtype`` when given. For every document (docs/training.md):

    * ``max_logit_diff_packed_vs_alone``: in the batch vs. alone; judged in float32 only (16-bit rounds
      other matrix shapes differently);
    * ``max_logit_diff_other_documents_changed``: vs. itself in a batch whose other documents hold other
      tokens (same lengths and shapes): any difference crossed from another document.

    ``holds``: neither (where judged) is above ``ISOLATION_TOLERANCE``. A kernel that fails to run raises an
    InputError naming it and the device.
    """
    import torch

    kernel = model.config._attn_implementation
    autocast = torch.autocast(model.device.type, dtype=autocast_dtype) if autocast_dtype else nullcontext()
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            alone_diff, other_diff, documents, layout = _isolation_diffs(model, collator, windows, autocast)
    except Exception as err:  # the first forward on the training device: any failure is the kernel's
        raise InputError(
            f"--attn_implementation {kernel} cannot run on {model.device} ({err.__class__.__name__}: "
            f"{str(err)[:300]}). Use --attn_implementation sdpa, or install the kernel for this device. "
            "Nothing was trained."
        ) from err
    finally:
        model.train(was_training)
    compute_dtype = str(autocast_dtype or next(model.parameters()).dtype).replace("torch.", "")
    result = {
        "checked": True,
        "attn_implementation": kernel,
        "layout": layout,
        "device": str(model.device),
        "compute_dtype": compute_dtype,
        "windows_in_batch": len(windows),
        "documents": documents,
        "max_logit_diff_packed_vs_alone": alone_diff,
        "max_logit_diff_other_documents_changed": other_diff,
        "tolerance": ISOLATION_TOLERANCE,
        "packed_vs_alone_judged": compute_dtype == "float32",
    }
    result["holds"] = isolation_failure(result) is None
    return result


def isolation_failure(result: dict) -> str | None:
    """Why a ``check_document_isolation`` result shows attention across documents, or None."""
    if result["max_logit_diff_other_documents_changed"] > ISOLATION_TOLERANCE:
        return (
            f"a document's logits change by {result['max_logit_diff_other_documents_changed']:.3g} when the other "
            "documents of its micro-batch change"
        )
    if result["compute_dtype"] == "float32" and result["max_logit_diff_packed_vs_alone"] > ISOLATION_TOLERANCE:
        return (
            f"a document packed with others gives other logits than alone (max diff "
            f"{result['max_logit_diff_packed_vs_alone']:.3g})"
        )
    return None


# --------------------------------------------------------------------------------------
# Resuming a training run (run_pretrain.py, run_cpt.py)
# --------------------------------------------------------------------------------------

#: --resume_from_checkpoint values that mean "the last checkpoint-N in --output_dir".
RESUME_LAST = ("true", "latest", "last")
RESUME_HELP = (
    "Continue a run from a checkpoint: a checkpoint-N folder, or latest (also: true, last) for the last "
    "checkpoint-N in --output_dir. Without it an --output_dir that already holds a checkpoint is refused: "
    "a run never continues on an earlier run's checkpoints without saying so."
)


def document_resume_flag(parser) -> None:
    """Put ``RESUME_HELP`` on the --resume_from_checkpoint of an HfArgumentParser (--help shows it)."""
    for action in parser._actions:
        if action.dest == "resume_from_checkpoint":
            action.help = RESUME_HELP


def parse_training_flags(parser, argv: list[str] | None) -> tuple:
    """A training script's argument dataclasses, from its flags or from one .json file (as run_clm.py). The
    checks TrainingArguments makes of its own flags (e.g. --load_best_model_at_end without evaluation) are the
    user's to fix: InputError, exit 2, with transformers' message. --help shows RESUME_HELP."""
    document_resume_flag(parser)
    argv = sys.argv[1:] if argv is None else argv
    try:
        if len(argv) == 1 and argv[0].endswith(".json"):
            return parser.parse_json_file(json_file=os.path.abspath(argv[0]))
        return parser.parse_args_into_dataclasses(args=argv)
    except ValueError as err:
        raise InputError(" ".join(str(err).split())) from err


def resume_checkpoint(resume_from_checkpoint: str | None, output_dir: str | os.PathLike) -> str | None:
    """The checkpoint a training run resumes from (None: it starts afresh), by ``RESUME_HELP``'s rule.

    InputError for a folder that does not exist, for ``latest`` without a checkpoint, and for an
    ``output_dir`` that holds a checkpoint when no --resume_from_checkpoint is given."""
    from transformers.trainer_utils import get_last_checkpoint

    output_dir = Path(output_dir)
    last = get_last_checkpoint(str(output_dir)) if output_dir.is_dir() else None
    if resume_from_checkpoint is None:
        if last is not None:
            raise InputError(
                f"{output_dir} already holds {last}. Pass --resume_from_checkpoint {last} to continue that run, "
                "or give a new --output_dir."
            )
        return None
    if str(resume_from_checkpoint).lower() in RESUME_LAST:
        if last is None:
            raise InputError(f"--resume_from_checkpoint {resume_from_checkpoint}: no checkpoint-N in {output_dir}.")
        return last
    if not Path(resume_from_checkpoint).is_dir():
        raise InputError(f"--resume_from_checkpoint {resume_from_checkpoint}: no such checkpoint folder.")
    return str(resume_from_checkpoint)


# --------------------------------------------------------------------------------------
# The model card of a Trainer run
# --------------------------------------------------------------------------------------


@dataclass
class ModelCard:
    """A run's model card: ``write_card``'s title, summary, setting and tags, and ``progress``, the rows
    that depend on the optimizer steps done when it is written (e.g. tokens seen)."""

    title: str
    summary: str
    setting: dict
    tags: list[str]
    progress: Callable[[int], dict] | None = None


class ModelCardMixin:
    """Mix into a Trainer (``class T(ModelCardMixin, Trainer)``) and set ``model_card``: the card that
    ``create_model_card`` writes into --output_dir is then the study's, on the main process. Trainer's
    ``push_to_hub`` writes it just before it uploads the folder, so the card on the Hub is the same."""

    model_card: ModelCard | None = None

    def create_model_card(self, *args, **kwargs):
        card = self.model_card
        if card is None or not self.is_world_process_zero():
            return
        progress = card.progress(self.state.global_step) if card.progress else {}
        write_card(self.args.output_dir, card.title, card.summary, {**card.setting, **progress}, card.tags)


def finish_training(trainer, metrics: dict, commit_message: str) -> None:
    """The end of a training run (run_pretrain.py, run_cpt.py): the metrics and the trainer state saved,
    then the model card written; under --push_to_hub the folder is pushed with it."""
    trainer.log_metrics("train", metrics)
    trainer.save_metrics("train", metrics)
    trainer.save_state()
    if trainer.args.push_to_hub:
        trainer.push_to_hub(commit_message=commit_message)
    else:
        trainer.create_model_card()
