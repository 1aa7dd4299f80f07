#!/usr/bin/env python
# /// script
# requires-python = ">=3.10"
# dependencies = ["torch==2.13.0", "transformers>=5.0", "datasets>=4.0", "numpy>=2.0", "tqdm"]
# ///
"""Bilingual cloze probing of every checkpoint of a run (``--questions``: predictions.jsonl, accuracy.json), the
bridge diagnostic (``--diagnostic_pairs``: bridge_diagnostic.json) and the manipulation checks (``--name_alignment``,
``--item_tiers``: manipulation_checks.json); step 3a of the study, run_transfer.py compares the runs probed here.

An option's score is the paper's mean token loss: the LOWEST wins, ties keep option order. The scoring, the
outputs and their reuse: docs/probing.md; the checks: docs/decomposition.md; refusals: docs/refusals.md.
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import numpy as np
import torch
from tqdm.auto import tqdm
from transformers import AutoModelForCausalLM, AutoTokenizer, HfArgumentParser

from cloze import (
    BLANK,
    EVAL_DIR_NAME,
    QuestionSet,
    fill_blanks,
    load_question_sets,
    position_bias,
    read_predictions,
    tie_credit,
)
from cloze import read_item_tiers as read_tier_file
from study_common import (
    WEIGHT_FILES,
    InputError,
    document_start_id,
    exit_on_input_error,
    local_weight_digests,
    pair_first_side,
    pair_segments,
    read_documents,
    setup_logging,
    weights_sha256,
    write_json_atomic,
    write_text_atomic,
)

logger = logging.getLogger("run_eval")

CHECKPOINT_DIR = re.compile(r"^checkpoint-(\d+)$")
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.json")
#: Ties above this share of a file's items at a checkpoint are warned about (the first-wins rule then moves the
#: accuracy toward position_bias.always_first_accuracy).
TIE_WARNING_RATE = 0.05


@dataclass
class EvalArguments:
    model_name_or_path: str = field(
        metadata={"help": "A model folder or a run folder (every checkpoint-N inside, then its final model)."}
    )
    questions: list[str] | None = field(
        default=None,
        metadata={"help": "Question files, folders, save_to_disk datasets or Hub ids (docs/probing.md#questions)."},
    )
    question_langs: list[str] | None = field(
        default=None,
        metadata={"help": "Question languages: 'STEM=LANG' entries, or one language per question set in load order."},
    )
    output_dir: str | None = field(
        default=None, metadata={"help": "Where the outputs go (default: MODEL/eval, where run_transfer.py looks)."}
    )
    batch_size: int = field(default=64, metadata={"help": "Filled sentences per forward pass."})
    dtype: Literal["float32", "bfloat16", "float16"] = field(
        default="float32", metadata={"help": "Model weights dtype (the paper used bfloat16)."}
    )
    loss_dtype: Literal["float32", "model"] = field(
        default="float32",
        metadata={"help": "float32: batched, logits in float32; model: the paper's loop, bit-identical to it, slow."},
    )
    device: str = field(default="auto", metadata={"help": "'auto' (cuda when present, else cpu), 'cpu', 'cuda:0'..."})
    revision: str | None = field(default=None, metadata={"help": "Hub revision of a Hub dataset of --questions."})
    strict: bool = field(default=False, metadata={"help": "Turn question quirks (cloze.QUIRK_TEXT) into errors."})
    overwrite_output_dir: bool = field(
        default=False, metadata={"help": "Recompute everything instead of reusing results in --output_dir."}
    )
    diagnostic_pairs: str | None = field(
        default=None, metadata={"help": "Held-out parallel pairs ('en' and 'tgt'): writes bridge_diagnostic.json."}
    )
    name_alignment: str | None = field(
        default=None, metadata={"help": "A world's name_alignment.json: name checks in manipulation_checks.json."}
    )
    item_tiers: str | None = field(
        default=None, metadata={"help": "A world's item_tiers.json (needs --questions): per-tier accuracy checks."}
    )


# --------------------------------------------------------------------------------------
# The checkpoints of a model folder or a run folder
# --------------------------------------------------------------------------------------


@dataclass
class Checkpoint:
    step: int
    path: Path
    weights_sha256: str

    @property
    def key(self) -> tuple[int, str]:
        return self.step, str(self.path)

    def entry(self) -> dict:  # how this checkpoint's entry in every output starts
        return {"step": self.step, "path": str(self.path), "weights_sha256": self.weights_sha256}


@dataclass
class Run:
    root: Path  # the model or run folder, absolute
    checkpoints: list[Checkpoint]  # in step order
    cpt_setting: dict | None  # what run_cpt.py records in config.json


def find_checkpoints(model_name_or_path: str) -> Run:
    """The checkpoints of a model folder (its step: trainer_state.json's, else 0) or of a run folder as
    run_pretrain.py and run_cpt.py leave it (checkpoint-N folders, then the final model unless it is the last of
    them), each refused unless it holds a model and its tokenizer."""
    root = Path(model_name_or_path).resolve()
    if not root.is_dir():
        raise InputError(f"{model_name_or_path}: not a folder (give a model folder or a run folder).")
    found = {int(m.group(1)): child for child in root.iterdir() if (m := CHECKPOINT_DIR.match(child.name))}
    if (root / "config.json").is_file():
        state = root / "trainer_state.json"
        if found and not state.is_file():
            raise InputError(f"{root}: the final model has no trainer_state.json, so its step is unknown.")
        step = json.loads(state.read_text())["global_step"] if state.is_file() else 0
        if step in found:
            logger.info("%s: the final model is checkpoint-%d, probed once", root, step)
        found.setdefault(step, root)
    if not found:
        raise InputError(f"{root}: no model (config.json) and no checkpoint-N folder.")
    checkpoints = []
    for step, folder in sorted(found.items()):
        digests = local_weight_digests(folder)
        if not (folder / "config.json").is_file() or not digests:
            raise InputError(f"{folder}: not a saved model (config.json and weights: {', '.join(WEIGHT_FILES)}).")
        if not any((folder / name).is_file() for name in TOKENIZER_FILES):
            raise InputError(f"{folder}: no tokenizer files ({', '.join(TOKENIZER_FILES)}); save it with the model.")
        checkpoints.append(Checkpoint(step, folder, weights_sha256(digests)))
    config = json.loads((checkpoints[-1].path / "config.json").read_text())
    return Run(root, checkpoints, config.get("cpt_setting"))


def resolve_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def load_model(directory: Path, dtype: str, device: torch.device, attn_implementation: str | None = "sdpa"):
    model = AutoModelForCausalLM.from_pretrained(directory, dtype=dtype, attn_implementation=attn_implementation)
    model.config.use_cache = False
    return model.to(device).eval()


def each_model(args: EvalArguments, checkpoints: list[Checkpoint], desc: str):
    """(checkpoint, model, tokenizer) of each checkpoint in turn, one model in memory at a time."""
    device = resolve_device(args.device)
    for checkpoint in tqdm(checkpoints, desc=desc, disable=not checkpoints):
        model = load_model(checkpoint.path, args.dtype, device)
        yield checkpoint, model, AutoTokenizer.from_pretrained(checkpoint.path)


@dataclass
class Output:
    """One output file: what it records (``header``) and its entries by checkpoint key (step, path)."""

    path: Path
    header: dict
    done: dict

    def write(self) -> dict:
        result = {"checkpoints": [self.done[key] for key in sorted(self.done)], **self.header}
        write_json_atomic(self.path, result)
        return result


#: Per output file, what its results depend on besides the weights: another value in --output_dir is refused.
IDENTITY = {
    "accuracy.json": ("model_name_or_path", "dtype", "loss_dtype", "questions_sha256"),
    "bridge_diagnostic.json": ("pairs_sha256", "dtype"),
    "manipulation_checks.json": ("model_name_or_path", "dtype", "name_alignment"),
}


def open_output(args: EvalArguments, run: Run, name: str, header: dict) -> Output:
    """``name`` in --output_dir with the entries of an earlier one that still hold, deleted checkpoints' included;
    none when the run was trained again since (other weights or cpt_setting). One made with other IDENTITY fields
    is refused (called for every output before anything runs)."""
    path = Path(args.output_dir) / name
    if args.overwrite_output_dir or not path.is_file():
        return Output(path, header, {})
    previous = json.loads(path.read_text(encoding="utf-8"))
    differ = [key for key in IDENTITY[name] if previous.get(key) != header[key]]
    if differ:
        raise InputError(
            f"{path.parent} already holds results made with a different "
            + ", ".join(f"{key} ({previous.get(key)!r}, now {header[key]!r})" for key in differ)
            + ". Use another --output_dir or pass --overwrite_output_dir to replace them."
        )
    current = {c.key: c.weights_sha256 for c in run.checkpoints}
    entries = {(e["step"], e["path"]): e for e in previous["checkpoints"]}
    changed = [k for k, e in entries.items() if k in current and e["weights_sha256"] != current[k]]
    if changed or previous["cpt_setting"] != run.cpt_setting:
        logger.warning("%s: the run was trained again since (other weights or cpt_setting): all probed again", path)
        return Output(path, header, {})
    return Output(path, header, entries)


# --------------------------------------------------------------------------------------
# Scoring: token log-probabilities of many sequences, batched as prefix trees
# --------------------------------------------------------------------------------------


def _body_and_head(model):
    """The transformer body and the output head, so that the head (the costly vocabulary projection) runs on real
    positions only; None for models that post-process their logits (they keep the plain path)."""
    head, body = model.get_output_embeddings(), getattr(model, "model", None)
    post_processed = any(
        getattr(model.config, name, None) for name in ("final_logit_softcapping", "logit_scale", "logits_scaling")
    )
    return None if head is None or body is None or post_processed else (body, head)


@dataclass
class PrefixTree:
    """Token sequences with a common first token merged into one trie, run as one batch row: node k sits at
    position ``depths[k]`` and sees ``visible[k]`` (itself and its ancestors); parents come before children."""

    tokens: list[int]
    parents: list[int]  # -1 for the root (node 0)
    depths: list[int]
    visible: np.ndarray  # [n, n] bool


def build_prefix_trees(
    sequences: list[list[int]], groups: list[list[int]] | None = None
) -> tuple[list[PrefixTree], list[tuple[int, np.ndarray]]]:
    """One prefix tree per group of sequence indices and first token (default: one per sequence), and for every
    sequence its ``(tree, nodes)``: the node of each of its tokens."""
    groups = groups if groups is not None else [[i] for i in range(len(sequences))]
    trees, located, child = [], [None] * len(sequences), {}  # child[(tree, node, token)]: a node of that tree
    for group in groups:
        roots = {}  # first token -> tree of this group
        for i in group:
            assert located[i] is None and sequences[i], f"sequence {i}: listed twice, or empty"
            if sequences[i][0] not in roots:
                roots[sequences[i][0]] = len(trees)
                trees.append(PrefixTree([sequences[i][0]], [-1], [0], None))
            t, tree, nodes = roots[sequences[i][0]], trees[roots[sequences[i][0]]], [0]
            for depth, token in enumerate(sequences[i][1:], 1):
                if (t, nodes[-1], token) not in child:  # a new node; a shared prefix reuses the nodes it has
                    child[t, nodes[-1], token] = len(tree.tokens)
                    tree.tokens.append(token)
                    tree.parents.append(nodes[-1])
                    tree.depths.append(depth)
                nodes.append(child[t, nodes[-1], token])
            located[i] = (t, np.array(nodes))
    assert all(where is not None for where in located), "every sequence belongs to a group"
    for tree in trees:  # a node sees what its parent sees, and itself (parents come first)
        tree.visible = np.eye(len(tree.tokens), dtype=bool)
        for k, parent in enumerate(tree.parents[1:], 1):
            tree.visible[k] |= tree.visible[parent]
    return trees, located


def _tree_batches(trees: list[PrefixTree], sequences_in: np.ndarray, batch_size: int) -> list[list[int]]:
    """Trees, largest first (little padding), in batches that hold at least ``batch_size`` sequences."""
    batches, current, held = [], [], 0
    for t in sorted(range(len(trees)), key=lambda t: -len(trees[t].tokens)):
        current.append(t)
        held += sequences_in[t]
        if held >= batch_size:
            batches.append(current)
            current, held = [], 0
    return batches + [current] if current else batches


def _batch_arrays(trees: list[PrefixTree], batch: list[int], first_node: np.ndarray, pad_id: int):
    """Input ids, positions and tree masks of a batch of trees (padding attends to itself only), and its edges:
    every non-root node, predicted from its parent's position (a flat index into the batch)."""
    width = max(len(trees[t].tokens) for t in batch)
    input_ids = np.full((len(batch), width), pad_id, dtype=np.int64)
    position_ids = np.zeros((len(batch), width), dtype=np.int64)
    visible = np.zeros((len(batch), width, width), dtype=bool)
    visible[:, np.arange(width), np.arange(width)] = True  # no empty softmax row
    edge_parent, edge_token, edge_node = [], [], []
    for row, t in enumerate(batch):
        tree, n = trees[t], len(trees[t].tokens)
        input_ids[row, :n] = tree.tokens
        position_ids[row, :n] = tree.depths
        visible[row, :n, :n] = tree.visible
        edge_parent += [row * width + p for p in tree.parents[1:]]
        edge_token += tree.tokens[1:]
        edge_node += range(first_node[t] + 1, first_node[t] + n)
    return input_ids, position_ids, visible, (np.array(edge_parent, dtype=np.int64), edge_token, edge_node)


@torch.inference_mode()
def token_logprobs(
    model, sequences: list[list[int]], groups: list[list[int]] | None = None, batch_size=64, pad_id=0, desc=None
) -> list[np.ndarray]:
    """log p(ids[j+1] | ids[:j+1]) for every sequence, as float64 arrays of length len(ids) - 1: the numbers of each
    sequence run alone, whatever the grouping, batch size or ``pad_id`` (padding, on the right, attends only to
    itself). A group's sequences (the options of a question) run as one PrefixTree (docs/probing.md)."""
    trees, located = build_prefix_trees(sequences, groups)
    device, dtype = next(model.parameters()).device, next(model.parameters()).dtype
    split = _body_and_head(model)
    # Logits in chunks of ~16 MB on a CPU (they stay in cache for the loss), ~256 MB on a GPU.
    chunk_elements = 1 << 22 if device.type == "cpu" else 1 << 26
    rows_per_chunk = max(1, chunk_elements // model.config.get_text_config().vocab_size)
    first_node = np.cumsum([0] + [len(tree.tokens) for tree in trees])
    node_logprobs = np.zeros(first_node[-1])  # of every node of every tree, flat (a root predicts nothing: 0)
    batches = _tree_batches(trees, np.bincount([t for t, _ in located], minlength=len(trees)), batch_size)
    for batch in tqdm(batches, desc=desc or "scoring", leave=False, disable=desc is None):
        input_ids, position_ids, visible, (edge_parent, edge_token, edge_node) = _batch_arrays(
            trees, batch, first_node, pad_id
        )
        if not len(edge_parent):
            continue
        mask = torch.zeros(visible.shape, dtype=dtype)[:, None].masked_fill_(
            ~torch.from_numpy(visible)[:, None], torch.finfo(dtype).min
        )
        inputs = {"input_ids": torch.from_numpy(input_ids).to(device), "use_cache": False,
                  "position_ids": torch.from_numpy(position_ids).to(device), "attention_mask": mask.to(device)}  # fmt: skip
        if split is not None:
            states, project = split[0](**inputs).last_hidden_state, split[1]
        else:  # logits post-processed by the model: take them whole
            states, project = model(**inputs).logits, (lambda x: x)
        # The positions that predict something, once each (a parent of several children is projected once).
        predicting, first_edge, edge_row = np.unique(edge_parent, return_index=True, return_inverse=True)
        states = states.reshape(-1, states.shape[-1])[torch.from_numpy(predicting).to(device)]
        edges = [torch.from_numpy(edge_row).to(device), torch.tensor(edge_token, device=device)]
        logprobs = _edge_logprobs(project, states, *edges, torch.from_numpy(first_edge).to(device), rows_per_chunk)
        node_logprobs[edge_node] = logprobs.double().cpu().numpy()
    return [node_logprobs[first_node[t] + nodes[1:]] for t, nodes in located]


def _edge_logprobs(project, states, edge_row, edge_token, first_edge, rows_per_chunk: int) -> torch.Tensor:
    """log p(edge_token[e] | states[edge_row[e]]) for every edge, float32, the logits ``project``ed in chunks.
    log-sum-exp = cross-entropy + target logit, with an edge of each row (``first_edge``) as target: torch's fused
    cross-entropy is ~1.5x faster than torch.logsumexp on CPU (and it is what the paper's loss computes)."""
    logprobs = torch.empty(len(edge_row), dtype=torch.float32, device=states.device)
    row_token = edge_token[first_edge]
    for start in range(0, states.shape[0], rows_per_chunk):
        logits = project(states[start : start + rows_per_chunk]).float()
        targets = row_token[start : start + rows_per_chunk]
        normaliser = torch.nn.functional.cross_entropy(logits, targets, reduction="none")
        normaliser += logits.gather(1, targets[:, None])[:, 0]
        edges = ((edge_row >= start) & (edge_row < start + rows_per_chunk)).nonzero()[:, 0]
        local = edge_row[edges] - start
        logprobs[edges] = logits[local, edge_token[edges]] - normaliser[local]
    return logprobs


@dataclass
class ScoringPlan:
    """The distinct token sequences to run, and the sequence of each option."""

    sequences: list[list[int]]
    options: list[list[list[int]]]  # per question set, per item, per option: its sequence's index
    # per question item, the sequences first seen in it: they run as one prefix tree (see token_logprobs)
    groups: list[list[int]]


def plan_scoring(tokenizer, question_sets: list[QuestionSet]) -> ScoringPlan:
    """Tokenize every filled sentence once. Identical sentences (no blank, duplicate options) share one
    sequence, so their scores are bit-identical and ties resolve to the first option as in the paper."""
    start = document_start_id(tokenizer)
    texts = [fill_blanks(it["question"], o) for qs in question_sets for it in qs.items for o in it["options"]]
    encoded = iter(tokenizer(texts, add_special_tokens=False)["input_ids"])
    sequences, index_of, options, groups = [], {}, [], []
    for qs in question_sets:
        options.append([])
        for item in qs.items:
            item_plan, group = [], []
            for ids in (tuple([start] + next(encoded)) for _ in item["options"]):
                if ids not in index_of:
                    index_of[ids] = len(sequences)
                    sequences.append(list(ids))
                    group.append(index_of[ids])
                item_plan.append(index_of[ids])
            options[-1].append(item_plan)
            if group:
                groups.append(group)
    return ScoringPlan(sequences, options, groups)


@torch.inference_mode()
def paper_loop_losses(model, sequences: list[list[int]], desc: str | None = None) -> list[float]:
    """The paper's loss of every sequence as its loop computes it on current transformers: one sequence per
    forward, ``CrossEntropyLoss(reduction="mean")`` on the logits in the dtype the model returns them. With 16-bit
    weights any other shape of computation rounds differently, so this path is kept apart from token_logprobs."""
    device = next(model.parameters()).device
    loss = torch.nn.CrossEntropyLoss(reduction="mean")
    losses = []
    for ids in tqdm(sequences, desc=desc or "scoring", leave=False, disable=desc is None):
        input_ids = torch.tensor([ids], device=device)
        logits = model(input_ids=input_ids, use_cache=False).logits[0, :-1]
        losses.append(float(loss(logits, input_ids[0, 1:])))
    return losses


def predict(scores: list[float]) -> int:
    """Index of the lowest score; ties keep option order (a stable sort, as in the paper)."""
    return min(range(len(scores)), key=lambda k: (scores[k], k))


def score_question_sets(
    model, tokenizer, question_sets: list[QuestionSet], batch_size: int, desc=None, loss_dtype="float32"
) -> list[list[list[float]]]:
    """Per question set, per item, the mean token loss of every option; loss_dtype "model": the paper's loop."""
    plan = plan_scoring(tokenizer, question_sets)
    limit = getattr(model.config, "max_position_embeddings", None)
    longest = max((len(s) for s in plan.sequences), default=0)
    if limit and longest > limit:
        raise InputError(f"A filled question is {longest} tokens long; the model takes at most {limit}.")
    if loss_dtype == "model":
        losses = paper_loop_losses(model, plan.sequences, desc=desc)
    else:
        logprobs = token_logprobs(model, plan.sequences, plan.groups, batch_size, desc=desc)
        losses = [float(-lp.mean()) for lp in logprobs]
    return [[[losses[seq] for seq in item] for item in set_plan] for set_plan in plan.options]


# --------------------------------------------------------------------------------------
# Probing every checkpoint, with reuse of what an output folder already holds
# --------------------------------------------------------------------------------------


def item_accounting(qs: QuestionSet, set_scores: list[list[float]]) -> tuple[list[dict], dict]:
    """Per item: prediction (first-wins), correctness, tied options and fractional credit; and the set's totals."""
    rows = []
    for item, scores in zip(qs.items, set_scores):
        tied, credit = tie_credit(scores, item["answer"])
        prediction = predict(scores)
        rows.append({"prediction": prediction, "correct": prediction in item["answer"], "tied_best": tied,
                     "credit_fractional": credit})  # fmt: skip
    n, correct = len(rows), sum(r["correct"] for r in rows)
    fractional, ties = sum(r["credit_fractional"] for r in rows), sum(r["tied_best"] > 1 for r in rows)
    # ties_advantage: what the first-wins rule gains over random tie-breaking, the part of the accuracy ties give
    return rows, {"lang": qs.lang, "correct": correct, "total": n, "accuracy": correct / n, "ties": ties,
                  "tie_rate": ties / n, "correct_fractional": fractional, "accuracy_fractional": fractional / n,
                  "ties_advantage": (correct - fractional) / n}  # fmt: skip


def probing_header(args: EvalArguments, question_sets: list[QuestionSet], run: Run) -> dict:
    """What is probed (accuracy.json's header)."""
    fingerprints = sorted((qs.stem, qs.fingerprint) for qs in question_sets)
    return {
        "model_name_or_path": str(run.root),
        "cpt_setting": run.cpt_setting,
        "scoring": "mean_token_loss",  # run_transfer.py checks that the runs it compares share it
        "dtype": args.dtype,
        "loss_dtype": args.loss_dtype,
        "questions": {qs.stem: qs.describe() for qs in question_sets},
        "questions_sha256": hashlib.sha256(json.dumps(fingerprints).encode()).hexdigest(),
    }


def evaluate_model(args: EvalArguments, question_sets: list[QuestionSet], run: Run, output: Output) -> dict:
    """Probe every checkpoint of ``run`` not already in ``output`` (accuracy.json) and its predictions.jsonl;
    both rewritten after each checkpoint (a crash loses at most the one being scored)."""
    predictions = output.path.with_name("predictions.jsonl")
    lines = defaultdict(list)
    for line in predictions.read_text(encoding="utf-8").splitlines() if predictions.is_file() else []:
        row = json.loads(line)
        lines[(row["step"], row["checkpoint"])].append(line)
    items = sum(len(qs.items) for qs in question_sets)
    output.done = {key: entry for key, entry in output.done.items() if len(lines[key]) == items}
    todo = [c for c in run.checkpoints if c.key not in output.done]
    logger.info("%s: %d checkpoint(s) to score, %d reused", run.root, len(todo), len(output.done))

    def write_outputs() -> dict:
        write_text_atomic(predictions, "".join(line + "\n" for key in sorted(output.done) for line in lines[key]))
        return output.write()

    for checkpoint, model, tokenizer in each_model(args, todo, "checkpoints"):
        scores = score_question_sets(model, tokenizer, question_sets, args.batch_size, f"step {checkpoint.step}",
                                     args.loss_dtype)  # fmt: skip
        lines[checkpoint.key], accuracy = _checkpoint_results(checkpoint, question_sets, scores)
        output.done[checkpoint.key] = checkpoint.entry() | {"accuracy": accuracy}
        write_outputs()
    return write_outputs()


def _checkpoint_results(checkpoint: Checkpoint, question_sets: list[QuestionSet], all_scores) -> tuple[list, dict]:
    """The predictions.jsonl lines of one scored checkpoint and its accuracy entry (warning on many ties)."""
    rows, accuracy = [], {}
    for qs, set_scores in zip(question_sets, all_scores):
        accounted, accuracy[qs.stem] = item_accounting(qs, set_scores)
        for index, (item, scores, counted) in enumerate(zip(qs.items, set_scores, accounted)):
            row = {"questions": qs.stem, "lang": qs.lang, "index": index, "step": checkpoint.step,
                   "checkpoint": str(checkpoint.path), "scores": scores, "answer": item["answer"], **counted}  # fmt: skip
            rows.append(json.dumps(row, ensure_ascii=False))
        acc = accuracy[qs.stem]
        if acc["tie_rate"] > TIE_WARNING_RATE:
            logger.warning(
                "step %d, %s: %d of %d items (%.1f%%) tie for the best score; accuracy %.3f under the paper's "
                "first-wins rule, %.3f with ties broken at random (always option 0 would score %.3f)",
                checkpoint.step, qs.stem, acc["ties"], acc["total"], 100 * acc["tie_rate"], acc["accuracy"],
                acc["accuracy_fractional"], position_bias(qs.items)["always_first_accuracy"],
            )  # fmt: skip
    logger.info("step %d: %s", checkpoint.step, {stem: round(acc["accuracy"], 3) for stem, acc in accuracy.items()})
    return rows, accuracy


# --------------------------------------------------------------------------------------
# Bridge diagnostic: does the first side of a pair help predict the second?
# --------------------------------------------------------------------------------------


def read_pairs(path: str) -> list[tuple[str, str]]:
    """(en, tgt) pairs from a .jsonl/.json/.csv/.tsv file with 'en' and 'tgt' columns."""
    pairs = list(zip(read_documents(path, "en", column_flag=None), read_documents(path, "tgt", column_flag=None)))
    if len(pairs) < 2:
        raise InputError(f"{path}: the bridge diagnostic needs at least 2 pairs (found {len(pairs)}).")
    empty = [i for i, (en, tgt) in enumerate(pairs) if not en.strip() or not tgt.strip()]
    if empty:
        raise InputError(f"{path}: pairs {empty[:10]} have an empty 'en' or 'tgt' side.")
    return pairs


def bridged_pair(first: list[int], second: list[int], start: int, separator_ids: list[int]) -> list[int]:
    """One bridged pair, as run_cpt.py packs it: its two segments (pair_segments) adjacent, positions continuing."""
    return [token for segment in pair_segments(first, second, start, separator_ids) for token in segment]


def bridge_diagnostic_losses(
    model, tokenizer, pairs: list[tuple[str, str]], batch_size=64, separator="", pair_order="en_first", seed=0
) -> dict:
    """Mean token loss of the second side of each pair (token-weighted) alone, after its own first side and after
    pair (i+1) mod n's side in that language; pair i's first side is ``pair_first_side(i, pair_order, seed)``."""
    start, n = document_start_id(tokenizer), len(pairs)
    separator_ids = tokenizer(separator, add_special_tokens=False)["input_ids"] if separator else []
    en, tgt = (tokenizer([pair[k] for pair in pairs], add_special_tokens=False)["input_ids"] for k in (0, 1))
    ids = {"en": en, "tgt": tgt}
    first = [pair_first_side(i, pair_order, seed) for i in range(n)]
    second = ["tgt" if side == "en" else "en" for side in first]
    scored = [ids[second[i]][i] for i in range(n)]
    sequences = [[start] + scored[i] for i in range(n)]
    for other in (0, 1):  # the context: pair i's own first side, then pair i+1's side in that language
        sequences += [bridged_pair(ids[first[i]][(i + other) % n], scored[i], start, separator_ids) for i in range(n)]
    logprobs = token_logprobs(model, sequences, batch_size=batch_size)
    tokens = sum(map(len, scored))
    losses = [-sum(logprobs[block * n + i][-len(scored[i]) :].sum() for i in range(n)) / tokens for block in range(3)]
    return dict(zip(("alone", "after_own_context", "after_mismatched_context"), map(float, losses))) | {
        "context_sides": {side: first.count(side) for side in ("en", "tgt")},
        "scored_sides": {side: second.count(side) for side in ("en", "tgt")},
    }


def diagnostic_header(args: EvalArguments, run: Run, pairs: list[tuple[str, str]]) -> dict:
    """What bridge_diagnostic.json records: the pairs, laid out as the run laid out its own (docs/probing.md)."""
    setting = run.cpt_setting or {}
    return {
        "pairs_file": str(Path(args.diagnostic_pairs).resolve()),
        "pairs_sha256": hashlib.sha256(json.dumps(pairs, ensure_ascii=False).encode()).hexdigest(),
        "pair_separator": setting.get("pair_separator") or "",
        "pair_order": setting.get("pair_order") or "en_first",
        "pair_order_seed": int(setting.get("seed") or 0),
        "dtype": args.dtype,
        "cpt_setting": run.cpt_setting,
    }


def run_bridge_diagnostic(args: EvalArguments, run: Run, pairs: list[tuple[str, str]], output: Output) -> dict:
    layout = output.header["pair_separator"], output.header["pair_order"], output.header["pair_order_seed"]
    todo = [c for c in run.checkpoints if c.key not in output.done]
    for checkpoint, model, tokenizer in each_model(args, todo, output.path.name):
        losses = bridge_diagnostic_losses(model, tokenizer, pairs, args.batch_size, *layout)
        output.done[checkpoint.key] = checkpoint.entry() | losses | {"pairs": len(pairs)}
        logger.info("bridge diagnostic step %d: %s", checkpoint.step, losses)
        output.write()
    return output.write()


# --------------------------------------------------------------------------------------
# Manipulation checks: name alignment outside the bridge, retention and learning per fact tier
# --------------------------------------------------------------------------------------


def read_name_alignment(path: str) -> dict:
    """synthetic_world.py's name_alignment.json (its items are consistent: tests/test_synthetic_world.py) plus
    ``forms``, each entity's names per side as written mid-sentence: with a leading space where that side's frames
    put one before the blank (``spaced``), as byte-level BPE folds it into the name."""
    try:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
        side_of = {f"en->{data['lang']}": "target", f"{data['lang']}->en": "en"}  # the side the options name
        spaced = {"en": False, "target": False}
        for item in data["items"]:
            spaced[side_of[item["direction"]]] |= item["frame"][: BLANK.search(item["frame"]).start()][-1:].isspace()
        forms = {side: [" " * spaced[side] + entity[side] for entity in data["entities"]] for side in spaced}
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as err:
        raise InputError(
            f"--name_alignment {path}: not a name_alignment.json of synthetic_world.py ({type(err).__name__}: {err})."
        ) from err
    return {**data, "forms": forms, "spaced": spaced}


def name_alignment_accuracy(model, tokenizer, alignment: dict, separator: str = "", batch_size: int = 64) -> dict:
    """Per direction, the accuracy of choosing an entity's name after a held-out sentence naming it in the other
    language, each option scored as a bridged pair by its frame's mean token loss (docs/decomposition.md)."""
    start, items = document_start_id(tokenizer), alignment["items"]
    separator_ids = tokenizer(separator, add_special_tokens=False)["input_ids"] if separator else []
    contexts = tokenizer([item["context"] for item in items], add_special_tokens=False)["input_ids"]
    frames = tokenizer([fill_blanks(it["frame"], o) for it in items for o in it["options"]], add_special_tokens=False)
    bounds = np.cumsum([0] + [len(item["options"]) for item in items])  # item k's options: bounds[k]:bounds[k + 1]
    sequences = [bridged_pair(contexts[k], frame, start, separator_ids)
                 for k in range(len(items)) for frame in frames["input_ids"][bounds[k] : bounds[k + 1]]]  # fmt: skip
    groups = [list(range(a, b)) for a, b in zip(bounds, bounds[1:])]  # an item's options: one prefix tree
    logprobs = token_logprobs(model, sequences, groups, batch_size)
    scores = [float(-lp[-len(frame) :].mean()) for lp, frame in zip(logprobs, frames["input_ids"])]
    hits, chance = defaultdict(list), defaultdict(list)
    for item, a, b in zip(items, bounds, bounds[1:]):
        hits[item["direction"]].append(item["options"][predict(scores[a:b])] == item["answer"])
        chance[item["direction"]].append(1 / len(item["options"]))
    return {
        d: {"accuracy": float(np.mean(h)), "n": len(h), "chance": float(np.mean(chance[d]))} for d, h in hits.items()
    }


def embedding_match(model, tokenizer, alignment: dict) -> dict:
    """Per direction, whether each entity's two names are nearest neighbours (cosine) among the mean input
    embeddings of the names' tokens (``alignment["forms"]``); ties go to the first; chance 1/n."""
    table = model.get_input_embeddings().weight.detach().float().cpu().numpy()

    def unit_vectors(names: list[str]) -> np.ndarray:
        vectors = np.stack([table[ids].mean(0) for ids in tokenizer(names, add_special_tokens=False)["input_ids"]])
        return vectors / np.maximum(np.linalg.norm(vectors, axis=1, keepdims=True), 1e-12)

    similarity = unit_vectors(alignment["forms"]["en"]) @ unit_vectors(alignment["forms"]["target"]).T
    n, lang, own = len(similarity), alignment["lang"], np.arange(len(similarity))
    hits = {f"en->{lang}": similarity.argmax(1) == own, f"{lang}->en": similarity.argmax(0) == own}
    return {d: {"accuracy": float(h.mean()), "n": n, "chance": 1 / n} for d, h in hits.items()}


def read_item_tiers(path: str, question_sets: list[QuestionSet]) -> dict:
    """A world's item_tiers.json (cloze.read_item_tiers), checked against the question files of its parallel
    group (``stems``): ``tier_of[i]`` is the tier of item i of each."""
    tiers = read_tier_file(path)
    sets = [qs for qs in question_sets if qs.base == tiers["parallel_group"]]
    if not sets:
        loaded = sorted({qs.base for qs in question_sets})
        raise InputError(f"{path}: parallel_group {tiers['parallel_group']!r} is none of the questions' {loaded}.")
    if len(tiers["tier_of"]) != len(sets[0].items):
        raise InputError(f"{path}: {len(tiers['tier_of'])} items, but {sets[0].stem} has {len(sets[0].items)}.")
    counts = {tier: tiers["tier_of"].count(tier) for tier in tiers["meaning"] if tier in tiers["tier_of"]}
    describe = {"file": str(Path(path).resolve()), "parallel_group": tiers["parallel_group"], "items_per_tier": counts}
    return {"describe": describe | {"meaning": tiers["meaning"]}, "stems": [qs.stem for qs in sets], **tiers}


def checks_header(args: EvalArguments, run: Run, alignment: dict | None, tiers: dict | None) -> dict:
    """What manipulation_checks.json records."""
    return {
        "model_name_or_path": str(run.root), "cpt_setting": run.cpt_setting, "dtype": args.dtype,
        "pair_separator": (run.cpt_setting or {}).get("pair_separator") or "",
        "name_alignment": alignment and {
            "file": str(Path(args.name_alignment).resolve()),
            "sha256": hashlib.sha256(json.dumps(alignment["items"], ensure_ascii=False).encode()).hexdigest(),
            "lang": alignment["lang"], "variant": alignment.get("variant"), "entities": len(alignment["entities"]),
            "name_leading_space": alignment["spaced"],
        },
        "item_tiers": tiers and tiers["describe"],
    }  # fmt: skip


def run_manipulation_checks(args: EvalArguments, run: Run, alignment, tiers, output: Output) -> dict:
    """Per checkpoint, name_alignment and embedding_match (with --name_alignment; reused as accuracy.json's
    entries are) and tier_accuracy (with --item_tiers, counted from predictions.jsonl)."""
    output.done = {c.key: c.entry() for c in run.checkpoints} | output.done
    correct = read_predictions(output.path.parent)[1] if tiers else {}
    for (step, _), entry in output.done.items():
        entry.pop("tier_accuracy", None)
        if tiers and all(step in correct[stem] for stem in tiers["stems"]):
            tier_of = np.array(tiers["tier_of"])
            entry["tier_accuracy"] = {stem: {t: float(correct[stem][step][tier_of == t].mean())
                                             for t in tiers["describe"]["items_per_tier"]} for stem in tiers["stems"]}  # fmt: skip
    separator = output.header["pair_separator"]
    todo = [c for c in run.checkpoints if alignment and "name_alignment" not in output.done[c.key]]
    for checkpoint, model, tokenizer in each_model(args, todo, output.path.name):
        entry = output.done[checkpoint.key]
        entry["name_alignment"] = name_alignment_accuracy(model, tokenizer, alignment, separator, args.batch_size)
        entry["embedding_match"] = embedding_match(model, tokenizer, alignment)
        logger.info("manipulation checks step %d: %s", checkpoint.step, entry["name_alignment"])
        output.write()
    return output.write()


# --------------------------------------------------------------------------------------
# Main
# --------------------------------------------------------------------------------------


def parse_arguments(argv: list[str] | None) -> EvalArguments:
    """The probing flags, checked."""
    parser = HfArgumentParser(EvalArguments, description=__doc__)
    (args,) = parser.parse_args_into_dataclasses(args=argv)
    if not args.questions and not args.diagnostic_pairs and not args.name_alignment:
        parser.error("pass --questions (and/or --diagnostic_pairs, --name_alignment)")
    if args.item_tiers and not args.questions:
        parser.error("--item_tiers gives the tiers of --questions items: pass the questions too")
    if args.batch_size < 1:
        parser.error("--batch_size must be >= 1")
    if args.output_dir is None:  # beside the checkpoints it scores, where run_transfer.py looks for it
        args.output_dir = str(Path(args.model_name_or_path) / EVAL_DIR_NAME)
    return args


def main(argv: list[str] | None = None) -> None:
    # 1. Arguments and logging.
    args = parse_arguments(argv)
    setup_logging()
    # 2. The inputs, validated before anything is written: the questions (--strict: their quirks are errors), the
    #    diagnostic pairs, the name alignment items, the fact tiers; the checkpoints, each with its tokenizer.
    question_sets = (
        load_question_sets(args.questions, args.question_langs, args.strict, args.revision) if args.questions else []
    )
    pairs = read_pairs(args.diagnostic_pairs) if args.diagnostic_pairs else None
    alignment = read_name_alignment(args.name_alignment) if args.name_alignment else None
    tiers = read_item_tiers(args.item_tiers, question_sets) if args.item_tiers else None
    run = find_checkpoints(args.model_name_or_path)
    # 3. The outputs, each with the results --output_dir holds that still hold (results made from other inputs are
    #    refused here, before anything runs).
    probing = question_sets and open_output(args, run, "accuracy.json", probing_header(args, question_sets, run))
    diagnostic = pairs and open_output(args, run, "bridge_diagnostic.json", diagnostic_header(args, run, pairs))
    header = checks_header(args, run, alignment, tiers)
    checks = (alignment or tiers) and open_output(args, run, "manipulation_checks.json", header)
    # 4. Probing: every checkpoint scored on every question set (finished checkpoints reused).
    if probing:
        evaluate_model(args, question_sets, run, probing)
    # 5. The bridge diagnostic on held-out pairs.
    if diagnostic:
        run_bridge_diagnostic(args, run, pairs, diagnostic)
    # 6. The manipulation checks.
    if checks:
        run_manipulation_checks(args, run, alignment, tiers, checks)


if __name__ == "__main__":
    exit_on_input_error(main)
