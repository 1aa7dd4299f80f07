"""What run_pretrain.py and run_cpt.py share: the gloo backend of a CPU launch, the batch layout of packed windows
per attention kernel and the flash guard, the document-isolation check, flag parsing and the resume convention,
and the model card of a Trainer run. Why each is so: docs/training.md."""

from __future__ import annotations

import os
import sys
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path

from transformers import Trainer

from study_common import InputError, write_card

# ---- Distributed training on CPU


def use_cpu_backend_without_gpu() -> None:
    """Make a multi-process launch without a GPU train over gloo (call before TrainingArguments are built):
    ``accelerate launch`` does not pass ``use_cpu`` on, and each process would train alone."""
    import torch

    launched_distributed = int(os.environ.get("WORLD_SIZE", "1")) > 1
    if launched_distributed and not torch.cuda.is_available():
        os.environ.setdefault("ACCELERATE_USE_CPU", "true")


# ---- Packed windows as a batch, per attention implementation

#: Kernels whose mask transformers builds per document from restarting position ids, for any number of rows,
#: without attention_mask and KV cache (masking_utils ``find_packed_sequence_indices``).
DOCUMENT_MASK_FROM_POSITION_IDS = frozenset({"sdpa", "eager", "flex_attention"})

#: The sequence-boundary kwargs of flash kernels (``FlashAttentionKwargs``: with all four, the varlen path),
#: passed by Qwen2 from ``Qwen2ForCausalLM.forward(**kwargs)`` down to the attention function.
SEQUENCE_BOUNDARY_KEYS = ("cu_seq_lens_q", "cu_seq_lens_k", "max_length_q", "max_length_k")


def is_flash_attention(attn_implementation: str) -> bool:
    """Flash kernels, by transformers' own rule (``is_flash_attention_requested``: "flash" in the name)."""
    return "flash" in attn_implementation


def uses_flattened_layout(attn_implementation: str) -> bool:
    """Whether packed windows go to the model as one flattened row with sequence boundaries: flash kernels infer
    documents from position ids only for one row, so they (and unknown kernels) get it; sdpa/eager/flex_attention
    keep B rows (on one row their dense mask would be (B*L)^2)."""
    return attn_implementation not in DOCUMENT_MASK_FROM_POSITION_IDS


def packed_batch(input_ids, position_ids, labels, attn_implementation: str, *, flatten: bool | None = None) -> dict:
    """The model's batch for B packed windows (B x L, position ids restarting at every document), never with an
    attention_mask: padded (the B rows) or flattened (one row of B*L with ``DataCollatorWithFlattening``'s
    sequence boundaries); ``flatten`` None: by ``uses_flattened_layout``."""
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
    """Refuse a kernel that cannot train on the CPU (flex_attention has no backward there; flash needs a GPU)."""
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
    """ValueError when B > 1 rows without sequence boundaries would reach a flash kernel (which would attend
    across documents). Shapes only: no device sync."""
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
    """``check_flash_batch`` on every call of ``model`` (a forward pre-hook), whatever the collator."""

    def guard(module, args, kwargs):
        inputs = {"input_ids": args[0], **kwargs} if args else kwargs  # model(input_ids, ...) or model(**batch)
        check_flash_batch(inputs, module.config._attn_implementation)

    model.register_forward_pre_hook(guard, with_kwargs=True)


# ---- Document isolation, checked on the run's own model before training

#: Largest logit difference that counts as rounding, not as attention across documents.
ISOLATION_TOLERANCE = 1e-4


def _window_features(window) -> dict:
    """Features of a window of documents of segments (each segment opening with the start token)."""
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
    """Does attention stay inside each document with this model's device, kernel, precision and batch layout?

    ``windows``: B >= 2 windows, each a list of documents of segments, batched by the run's ``collator``. Every
    document's logits are compared with it alone (judged in float32 only) and with the other documents changed
    (docs/training.md); ``holds``: neither is above ``ISOLATION_TOLERANCE``. A kernel that fails to run raises
    an InputError."""
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


# ---- Resuming a training run

#: --resume_from_checkpoint values that mean "the last checkpoint-N in --output_dir".
RESUME_LAST = ("true", "latest", "last")
RESUME_HELP = (
    "Continue a run from a checkpoint: a checkpoint-N folder, or latest (also: true, last) for the last "
    "checkpoint-N in --output_dir. Without it an --output_dir that already holds a checkpoint is refused: "
    "a run never continues on an earlier run's checkpoints without saying so."
)


def parse_training_flags(parser, argv: list[str] | None) -> tuple:
    """A training script's argument dataclasses, from its flags or one .json file (as run_clm.py), built over gloo
    on a CPU launch; the TrainingArguments' own refusals become InputErrors, and a kernel the training device
    cannot train with (``attn_implementation`` of the first dataclass) is refused. --help shows RESUME_HELP."""
    use_cpu_backend_without_gpu()  # before TrainingArguments are built
    for action in parser._actions:
        if action.dest == "resume_from_checkpoint":
            action.help = RESUME_HELP
    argv = sys.argv[1:] if argv is None else argv
    try:
        if len(argv) == 1 and argv[0].endswith(".json"):
            args = parser.parse_json_file(json_file=os.path.abspath(argv[0]))
        else:
            args = parser.parse_args_into_dataclasses(args=argv)
    except ValueError as err:
        raise InputError(" ".join(str(err).split())) from err
    training_args = args[-1]
    check_attention_implementation_trains_on(args[0].attn_implementation, training_args.device)
    if training_args.push_to_hub and training_args.hub_strategy == "all_checkpoints":
        training_args.hub_always_push = True  # else a checkpoint is skipped while the previous one uploads
    return args


def resume_checkpoint(resume_from_checkpoint: str | None, output_dir: str | os.PathLike) -> str | None:
    """The checkpoint a run resumes from (None: afresh), by ``RESUME_HELP``'s rule; anything else is refused."""
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


# ---- The model card of a Trainer run


@dataclass
class RunCard:
    """What a run's model card says (``write_card``'s arguments; huggingface_hub's ModelCard writes it).
    ``progress``: rows that depend on the steps done."""

    title: str
    summary: str
    setting: dict
    tags: list[str]
    progress: Callable[[int], dict] | None = None


class CardTrainer(Trainer):
    """A Trainer whose ``create_model_card`` (also called by ``push_to_hub``) writes the study's ``model_card``."""

    model_card: RunCard | None = None

    def create_model_card(self, *args, **kwargs):
        card = self.model_card
        if card is None or not self.is_world_process_zero():
            return
        progress = card.progress(self.state.global_step) if card.progress else {}
        write_card(self.args.output_dir, card.title, card.summary, {**card.setting, **progress}, card.tags)


def finish_training(trainer, metrics: dict, commit_message: str) -> None:
    """Save the metrics and the trainer state, then write the model card (or push the folder with it)."""
    trainer.log_metrics("train", metrics)
    trainer.save_metrics("train", metrics)
    trainer.save_state()
    if trainer.args.push_to_hub:
        trainer.push_to_hub(commit_message=commit_message)
    else:
        trainer.create_model_card()
