#!/usr/bin/env python
# /// script
# requires-python = ">=3.10"
# dependencies = ["torch==2.13.0", "transformers>=5.0", "datasets>=4.0", "huggingface-hub>=1.0", "numpy>=2.0", "tqdm"]
# ///
"""Bilingual cloze probing of every checkpoint of a run, the bridge diagnostic and the manipulation checks.

Step 3a of the study (run_transfer.py, step 3b, compares the runs probed here). Three jobs:

1. **Probing** (``--model_name_or_path`` + ``--questions``): score the paper's cloze questions on a model, on
   every checkpoint of a run directory, or on every checkpoint of a Hub repo, and write

   * ``predictions.jsonl``: one line per question item and checkpoint, ``{"questions", "lang", "index",
     "step", "checkpoint", "scores", "prediction", "answer", "correct", "tied_best", "credit_fractional"}``
     (``correct``: the paper's first-wins rule; ``tied_best``: options sharing the best score;
     ``credit_fractional``: the expected credit of breaking that tie uniformly at random), read back by
     ``cloze.read_predictions``;
   * ``accuracy.json``: ``{"checkpoints": [{"step", "path", "weights_sha256", "accuracy": {<questions>: {"lang",
     "correct", "total", "accuracy", "ties", "tie_rate", "correct_fractional", "accuracy_fractional",
     "ties_advantage"}}}], ...}`` plus what was probed (question files, their quirks and ``position_bias``,
     the scoring, dtype and loss_dtype, the run's ``cpt_setting``), and ``accuracy.csv`` with the same numbers.

   Finished checkpoints are reused when the output directory already holds them for the same questions,
   scoring and dtype, and for the same weights (each entry's ``weights_sha256``): a checkpoint retrained in place is
   probed again and the results of checkpoints no longer present dropped. Re-running after new checkpoints appear
   (or a crash) scores only what is new. bridge_diagnostic.json and manipulation_checks.json follow the same rule.

2. **Bridge diagnostic** (``--diagnostic_pairs``): per checkpoint, the mean token loss of the second side
   of held-out parallel pairs, laid out as run_cpt.py lays out a bridge (study_common.pair_first_side and
   pair_segments: the run's ``pair_order``; en_first: the target side after the English side), (a) alone,
   (b) after its own first side, (c) after another pair's first side -> ``bridge_diagnostic.json``.

3. **Manipulation checks** -> ``manipulation_checks.json`` (probe the base model with the same flags: the
   "before"). ``--name_alignment``: name alignment outside the bridge (``name_alignment_accuracy``,
   ``embedding_match``). ``--item_tiers``: cloze accuracy per question file and fact tier (English retention: the
   English questions on high/en_only facts before vs after CPT; target learning: target questions on absent ones).

Scoring (``--scoring``; every score is a loss: the LOWEST score wins, ties keep option order):

* ``mean_token_loss`` (default, the paper's): every run of underscores in the question is replaced by the
  option; the filled sentence is tokenized without special tokens and the document-start token
  (``study_common.document_start_id``: the tokenizer's end-of-text id) is prepended; the score is the mean
  token cross-entropy over every token after the prepended one.
* ``option_logprob``: minus the summed log-probability of the option's tokens only (the tokens of the
  filled sentence whose character span overlaps a filled-in blank), each conditioned on everything before
  it; the tokens of the question around the blank are not counted.
* ``byte_normalized``: minus the summed log-probability of all tokens after the prepended one, divided by
  the number of UTF-8 bytes of the filled sentence (a length normalisation that does not depend on the
  tokenizer).

``--loss_dtype float32`` (default) computes the losses in float32 on batched prefix trees; ``--loss_dtype
model`` runs the paper's own loop (one sentence per forward, the loss in the logits' dtype: bfloat16 with
bfloat16 weights), bit-identical to it, ties included.

Quirks of the released question files (no blank, several blanks, duplicate options, an answer that is not
among the options: cloze.QUIRK_TEXT) are counted and scored exactly as the authors' script scores them (no blank: all options
tie, the first is predicted; several blanks: all are filled; answer absent: always wrong); ``--strict`` turns
them into errors that name the file and the item.

Needs cloze.py and study_common.py beside it.
"""

from __future__ import annotations

import argparse
import csv
import hashlib
import io
import json
import logging
import os
import re
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import numpy as np
import torch
from tqdm.auto import tqdm
from transformers import AutoModelForCausalLM, AutoTokenizer, HfArgumentParser

from cloze import BLANK, QuestionSet, fill_blanks, load_question_sets, read_predictions, tie_credit
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
SCORINGS = ("mean_token_loss", "option_logprob", "byte_normalized")
ROOT_TOKENIZER_PATTERNS = ("tokenizer*", "special_tokens_map.json", "vocab.json", "merges.txt")
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


# --------------------------------------------------------------------------------------
# Arguments
# --------------------------------------------------------------------------------------


@dataclass
class EvalArguments:
    model_name_or_path: str | None = field(
        default=None,
        metadata={
            "help": "What to probe: a model directory (evaluated as one checkpoint; its step is trainer_state.json's "
            "global_step, else 0), a run directory (every checkpoint-N inside in step order, then the final model "
            "with its step from the run's trainer_state.json; a final model at the step of a checkpoint is skipped "
            "as a duplicate), or a Hub model repo id (its checkpoint-N folders and root model, and without --revision "
            "every branch holding a model, e.g. step-1000, recorded as org/name@branch; downloaded one at a time; "
            "offline, the folders of the cached snapshot)."
        },
    )
    questions: list[str] | None = field(
        default=None,
        metadata={
            "help": "Question sources, several allowed: a JSON file (a list of {question, options, answer}), a folder "
            "(every *.json inside, sorted; or a dataset saved with save_to_disk, one question set per split), or a "
            "Hub dataset id 'org/name' or 'org/name:split' (one question set per split). The question language is "
            "the file stem's suffix '_<lang>' (ko-culture-cloze_en.json is English); files 'X_en' and 'X_<lang>' "
            "are parallel (matched by position; a length mismatch is an error)."
        },
    )
    question_langs: list[str] | None = field(
        default=None,
        metadata={
            "help": "Override question languages: entries 'STEM=LANG' (e.g. my-questions=ko), or plain languages, "
            "one per question set in the order they are loaded."
        },
    )
    output_dir: str = field(
        default="eval_output",
        metadata={"help": "Where predictions.jsonl, accuracy.json/csv and bridge_diagnostic.json go."},
    )
    scoring: Literal["mean_token_loss", "option_logprob", "byte_normalized"] = field(
        default="mean_token_loss",
        metadata={
            "help": "mean_token_loss (the paper's): mean cross-entropy of every token of the filled sentence after "
            "the prepended start token. option_logprob: minus the summed log-prob of the tokens that overlap the "
            "filled-in option. byte_normalized: minus the summed log-prob of the sentence divided by its UTF-8 "
            "bytes. Lowest score wins; ties keep option order."
        },
    )
    batch_size: int = field(
        default=64,
        metadata={
            "help": "Filled sentences per forward pass: the options of several questions, each question's options "
            "run as one prefix tree (the question text before the blank computed once)."
        },
    )
    dtype: Literal["float32", "bfloat16", "float16"] = field(
        default="float32",
        metadata={"help": "Model weights dtype (the paper used bfloat16 on GPUs). See --loss_dtype for the losses."},
    )
    loss_dtype: Literal["float32", "model"] = field(
        default="float32",
        metadata={
            "help": "float32 (default): logits upcast to float32 before the loss, batched prefix trees (scores within "
            "1e-5 of the paper's loop computed in float32). model: the paper's computation on current transformers: "
            "one filled sentence per forward, no padding, no prefix sharing, CrossEntropyLoss(reduction='mean') on "
            "the logits in the dtype the model returns them (bfloat16 weights: a bfloat16 loss, with its rounding "
            "and its ties); bit-identical to the paper's loop, and as slow. mean_token_loss scoring only."
        },
    )
    device: str = field(default="auto", metadata={"help": "'auto' (cuda when present, else cpu), 'cpu', 'cuda:0'..."})
    attn_implementation: Literal["sdpa", "eager"] = field(
        default="sdpa", metadata={"help": "Attention implementation the model is loaded with."}
    )
    padding_side: Literal["right", "left"] = field(
        default="right",
        metadata={
            "help": "Where padding goes in a batch row. Scores do not depend on it (explicit positions and mask)."
        },
    )
    tokenizer_name_or_path: str | None = field(
        default=None,
        metadata={"help": "Tokenizer to use (default: the one saved with each checkpoint, else the run's)."},
    )
    revision: str | None = field(default=None, metadata={"help": "Hub revision of a Hub model or dataset."})
    strict: bool = field(
        default=False,
        metadata={
            "help": "Turn question quirks (no blank, several blanks, duplicate options, fewer than 2 distinct "
            "options, an answer not among the options) into errors naming the file and item."
        },
    )
    overwrite_output_dir: bool = field(
        default=False,
        metadata={"help": "Recompute everything instead of reusing checkpoints already scored in --output_dir."},
    )
    diagnostic_pairs: str | None = field(
        default=None,
        metadata={
            "help": "Held-out parallel pairs (.jsonl/.json with 'en' and 'tgt' columns, or a save_to_disk dataset "
            "whose kind=='pair' rows are used): writes bridge_diagnostic.json with, per checkpoint, the mean token "
            "loss of each pair's second side in the run's pair_order (en_first: the target side) alone "
            "([start]+second), after its own first side ([start]+first+[start]+second, loss over the second side's "
            "tokens only) and after another pair's first side (pair i gets pair i+1's side in that language)."
        },
    )
    diagnostic_max_pairs: int | None = field(
        default=None, metadata={"help": "Use only the first N diagnostic pairs (all by default)."}
    )
    name_alignment: str | None = field(
        default=None,
        metadata={
            "help": "A world's name_alignment.json: manipulation_checks.json gets, per checkpoint and direction, the "
            "4-way choice of each entity's name after a held-out sentence naming it in the other language (laid out "
            "as a bridged pair) and the nearest-neighbour match of its names' mean input embeddings."
        },
    )
    item_tiers: str | None = field(
        default=None,
        metadata={
            "help": "A world's item_tiers.json (needs --questions): manipulation_checks.json gets, per checkpoint, "
            "the accuracy of each question file on each tier of facts (high, low, absent, en_only)."
        },
    )


# --------------------------------------------------------------------------------------
# Checkpoints of a model, a run directory or a Hub repo
# --------------------------------------------------------------------------------------


@dataclass
class Checkpoint:
    step: int
    path: str  # as recorded in the outputs: an absolute local path, or 'org/name/checkpoint-N' on the Hub
    local_dir: Path | None = None  # None until downloaded (Hub)
    hub_repo: str | None = None
    hub_patterns: list[str] | None = None
    hub_revision: str | None = None  # a checkpoint published as a branch of the repo (path 'org/name@branch')
    weights_sha256: str | None = None  # computed once, by checkpoint_weights_sha256

    @property
    def hub_folder(self) -> str:
        """The checkpoint's folder inside its Hub revision ('' for a root model)."""
        if self.hub_revision is not None:
            return ""
        return self.path[len(self.hub_repo) + 1 :]


def _global_step(trainer_state: Path) -> int | None:
    if not trainer_state.is_file():
        return None
    try:
        return int(json.loads(trainer_state.read_text())["global_step"])
    except (ValueError, KeyError, TypeError) as err:
        raise ValueError(f"{trainer_state}: cannot read 'global_step' ({err}).") from err


def _checkpoints_in_listing(
    names: set[str], root_has_model: bool, root_step: int | None, where: str
) -> tuple[list[tuple[int, str]], list[dict]]:
    """(step, folder or '' for the root model) in step order, and what was skipped with the reason."""
    found, skipped = [], []
    for name in sorted(names):
        match = CHECKPOINT_DIR.match(name)
        if match:
            found.append((int(match.group(1)), name))
    steps = {step for step, _ in found}
    if root_has_model:
        if root_step is None and not found:
            found.append((0, ""))  # a plain model: the start of whatever comes next
        elif root_step is None:
            skipped.append({"path": where, "reason": "final model without trainer_state.json: its step is unknown"})
        elif root_step in steps:
            skipped.append({"path": where, "reason": f"final model duplicates checkpoint-{root_step}"})
        else:
            found.append((root_step, ""))
    return sorted(found), skipped


def find_checkpoints(model_name_or_path: str, revision: str | None = None) -> tuple[list[Checkpoint], list[dict]]:
    """Every checkpoint to probe, in step order, and the skipped ones (with reasons)."""
    path = Path(model_name_or_path)
    if path.is_dir():
        return _local_checkpoints(path.resolve())
    if not re.fullmatch(r"[\w.-]+/[\w.-]+", model_name_or_path):
        raise FileNotFoundError(f"{model_name_or_path}: not a directory and not a Hub repo id ('org/name').")
    return _hub_checkpoints(model_name_or_path, revision)


def _local_checkpoints(root: Path) -> tuple[list[Checkpoint], list[dict]]:
    names, skipped = set(), []
    for child in root.iterdir():
        if child.is_dir() and CHECKPOINT_DIR.match(child.name):
            if (child / "config.json").is_file():
                names.add(child.name)
            else:
                skipped.append({"path": str(child), "reason": "no config.json (not a loadable model)"})
    found, more = _checkpoints_in_listing(
        names, (root / "config.json").is_file(), _global_step(root / "trainer_state.json"), str(root)
    )
    if not found:
        raise FileNotFoundError(f"{root}: no model (config.json) and no checkpoint-N folder with a model inside.")
    checkpoints = [
        Checkpoint(step, str(root / name) if name else str(root), root / name if name else root) for step, name in found
    ]
    return checkpoints, skipped + more


def _hub_checkpoints(repo_id: str, revision: str | None) -> tuple[list[Checkpoint], list[dict]]:
    from huggingface_hub import HfApi, constants, snapshot_download

    if constants.HF_HUB_OFFLINE:
        # Offline: the folders of the cached snapshot are what can be probed.
        snapshot = snapshot_download(repo_id, revision=revision, local_files_only=True)
        checkpoints, skipped = _local_checkpoints(Path(snapshot))
        for ckpt in checkpoints:
            relative = ckpt.local_dir.relative_to(Path(snapshot)).as_posix()
            ckpt.path = f"{repo_id}/{relative}" if relative != "." else repo_id
        return checkpoints, skipped
    files = HfApi().list_repo_files(repo_id, revision=revision)
    top = {f.split("/", 1)[0] for f in files if "/" in f}
    names = {name for name in top if f"{name}/config.json" in files}
    root_files = [f for f in files if "/" not in f]
    root_step = None
    if "trainer_state.json" in root_files:
        state = snapshot_download(repo_id, revision=revision, allow_patterns=["trainer_state.json"])
        root_step = _global_step(Path(state) / "trainer_state.json")
    found, skipped = _checkpoints_in_listing(names, "config.json" in root_files, root_step, repo_id)
    checkpoints = [
        Checkpoint(
            step,
            f"{repo_id}/{name}" if name else repo_id,
            hub_repo=repo_id,
            # The run's own tokenizer files come along, for checkpoints saved without one.
            hub_patterns=([f"{name}/*"] if name else root_files) + list(ROOT_TOKENIZER_PATTERNS),
        )
        for step, name in found
    ]
    if revision is None:  # a learning curve may also be published as one branch per checkpoint
        branch_checkpoints, branch_skipped = _hub_branch_checkpoints(repo_id, {c.step for c in checkpoints})
        checkpoints = sorted(checkpoints + branch_checkpoints, key=lambda c: c.step)
        skipped += branch_skipped
    if not checkpoints:
        raise FileNotFoundError(f"Hub repo {repo_id}: no config.json and no checkpoint-N/config.json.")
    return checkpoints, skipped


BRANCH_STEP = re.compile(r"^(?:step|checkpoint)[-_]?(\d+)$")


def _hub_branch_checkpoints(repo_id: str, steps_found: set[int]) -> tuple[list[Checkpoint], list[dict]]:
    """Checkpoints published as branches (e.g. ``step-1000``): a branch whose root holds a model. Its step is
    its trainer_state.json global_step, else the number in its name (``step-N``, ``checkpoint-N``)."""
    from huggingface_hub import HfApi, snapshot_download

    api = HfApi()
    checkpoints, skipped = [], []
    for branch in sorted(ref.name for ref in api.list_repo_refs(repo_id).branches if ref.name != "main"):
        files = api.list_repo_files(repo_id, revision=branch)
        where = f"{repo_id}@{branch}"
        if "config.json" not in files:
            continue  # a branch without a model at its root is not a checkpoint
        step = None
        if "trainer_state.json" in files:
            state = snapshot_download(repo_id, revision=branch, allow_patterns=["trainer_state.json"])
            step = _global_step(Path(state) / "trainer_state.json")
        if step is None and (match := BRANCH_STEP.match(branch)):
            step = int(match.group(1))
        if step is None:
            skipped.append({"path": where, "reason": "branch without trainer_state.json or a step in its name"})
        elif step in steps_found:
            skipped.append({"path": where, "reason": f"duplicates the checkpoint of step {step}"})
        else:
            steps_found.add(step)
            root_files = [f for f in files if "/" not in f]
            checkpoints.append(Checkpoint(step, where, hub_repo=repo_id, hub_patterns=root_files, hub_revision=branch))
    return checkpoints, skipped


def _materialise(checkpoint: Checkpoint, revision: str | None) -> Path:
    if checkpoint.local_dir is None:
        from huggingface_hub import snapshot_download

        snapshot = Path(
            snapshot_download(
                checkpoint.hub_repo,
                revision=checkpoint.hub_revision or revision,
                allow_patterns=checkpoint.hub_patterns,
            )
        )
        name = checkpoint.hub_folder
        checkpoint.local_dir = snapshot / name if name else snapshot
    return checkpoint.local_dir


#: Weight files, as run_cpt.base_model_identity hashes a base model.


def checkpoint_weights_sha256(checkpoint: Checkpoint, revision: str | None) -> str:
    """SHA-256 of ``"<file name>\t<sha256 of its content>\n"`` over the weight files in name order (a base model's
    is the ``base_model_weights_sha256`` its CPT runs record), once per checkpoint: local files streamed, on the
    Hub the files' LFS hashes, the same numbers without a download (a file outside LFS is downloaded)."""
    if checkpoint.weights_sha256 is None:
        digests = _hub_weight_digests(checkpoint, revision) if checkpoint.local_dir is None else None
        if digests is None:
            digests = local_weight_digests(_materialise(checkpoint, revision))
        if not digests:
            raise FileNotFoundError(f"{checkpoint.path}: no weight file ({', '.join(WEIGHT_FILES)}).")
        checkpoint.weights_sha256 = weights_sha256(digests)
    return checkpoint.weights_sha256


def _hub_weight_digests(checkpoint: Checkpoint, revision: str | None) -> dict[str, str] | None:
    """The LFS sha256 of each weight file of a Hub checkpoint, or None when one is not stored in LFS."""
    from fnmatch import fnmatch

    from huggingface_hub import HfApi

    where = {"path_in_repo": checkpoint.hub_folder or None, "revision": checkpoint.hub_revision or revision}
    files = {e.path.rsplit("/", 1)[-1]: e.lfs for e in HfApi().list_repo_tree(checkpoint.hub_repo, **where)
             if hasattr(e, "lfs")}  # fmt: skip
    weights = {name: lfs for name, lfs in files.items() if any(fnmatch(name, p) for p in WEIGHT_FILES)}
    return None if None in weights.values() else {name: lfs.sha256 for name, lfs in weights.items()}


def _reusable(previous: list[dict], checkpoints: list[Checkpoint], revision: str | None, same_run: bool, where):
    """The entries of an earlier output still valid: a present checkpoint's when its weights are unchanged; a gone
    checkpoint's (rotated away by save_total_limit) unless the output is of another training of the run (not
    ``same_run``: another cpt_setting; or some weights changed: the run was retrained in place)."""
    current = {(c.step, c.path): c for c in checkpoints}
    here = [e for e in previous if (e["step"], e["path"]) in current]
    changed = [
        e for e in here if e.get("weights_sha256") != checkpoint_weights_sha256(current[e["step"], e["path"]], revision)
    ]
    gone = [e for e in previous if (e["step"], e["path"]) not in current] if changed or not same_run else []
    for entries, what in ((changed, "weights changed since they were probed: probed again"),
                          (gone, "gone, from another training of the run: their results dropped")):  # fmt: skip
        if entries:
            logger.warning("%s: %s: %s", where, [e["path"] for e in entries], what)
    return [e for e in previous if e not in changed and e not in gone]


def read_cpt_setting(model_name_or_path: str, checkpoints: list[Checkpoint]) -> dict | None:
    """The 'cpt_setting' that run_cpt.py records in config.json (root first, else the first checkpoint)."""
    candidates = [Path(model_name_or_path) / "config.json"] + [
        c.local_dir / "config.json" for c in checkpoints if c.local_dir is not None
    ]
    hub = [c for c in checkpoints if c.hub_repo and c.local_dir is None]
    if hub and not any(c.is_file() for c in candidates):
        from huggingface_hub import hf_hub_download

        name = hub[-1].hub_folder
        candidates.append(
            Path(
                hf_hub_download(
                    hub[-1].hub_repo, f"{name}/config.json" if name else "config.json", revision=hub[-1].hub_revision
                )
            )
        )
    for config in candidates:
        if config.is_file():
            setting = json.loads(config.read_text()).get("cpt_setting")
            if setting is not None:
                return setting
    return None


def _has_tokenizer(directory: Path) -> bool:
    return any((directory / name).is_file() for name in ("tokenizer.json", "tokenizer_config.json", "vocab.json"))


# --------------------------------------------------------------------------------------
# Scoring: token log-probabilities of many sequences, batched
# --------------------------------------------------------------------------------------


def resolve_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def _body_and_head(model):
    """Split a causal LM into its transformer body and output head, so that the head (the costly vocabulary
    projection) runs only on real (non-padding) positions. Models that post-process logits keep the plain path."""
    head = model.get_output_embeddings()
    body = getattr(model, "model", None)
    post_processed = any(
        getattr(model.config, name, None) for name in ("final_logit_softcapping", "logit_scale", "logits_scaling")
    )
    if head is None or body is None or post_processed:
        return None
    return body, head


@dataclass
class PrefixTree:
    """Token sequences with a common first token, merged into one prefix tree (a trie) run as one batch row.

    Node k holds one token and its parent is the node of the token before it, so a prefix shared by several
    sequences (the question text before the blank, shared by all options) is one chain of nodes. In the
    forward pass node k sits at position ``depths[k]`` and attends to the nodes ``visible[k]`` marks: itself
    and its ancestors (a tree-shaped causal mask). So its hidden state is the one it has in each of its
    sequences run alone, and the next-token distribution of a node is computed once, however many sequences
    continue from it. A parent always comes before its children.
    """

    tokens: list[int]
    parents: list[int]  # -1 for the root (node 0)
    depths: list[int]
    visible: np.ndarray  # [n, n] bool


def build_prefix_trees(
    sequences: list[list[int]], groups: list[list[int]] | None = None
) -> tuple[list[PrefixTree], list[tuple[int, np.ndarray]]]:
    """One prefix tree per group of sequence indices (per first token within a group; default: one tree per
    sequence), and for every sequence its ``(tree, nodes)``: the node of each of its tokens."""
    groups = groups if groups is not None else [[i] for i in range(len(sequences))]
    trees: list[PrefixTree] = []
    located: list[tuple[int, np.ndarray] | None] = [None] * len(sequences)
    causal = np.tri(max(map(len, sequences), default=0), dtype=bool)
    for group in groups:
        if len(set(group)) < len(group):
            raise ValueError(f"A group lists a sequence twice: {group}.")
        by_first: dict[int, list[int]] = {}
        for i in group:
            if located[i] is not None:
                raise ValueError(f"Sequence {i} is listed twice in the groups.")
            if not sequences[i]:
                raise ValueError(f"Sequence {i} is empty: every sequence needs at least its start token.")
            by_first.setdefault(sequences[i][0], []).append(i)
        for members in by_first.values():
            # In lexicographic order, the longest prefix a sequence shares with any earlier one is the one it
            # shares with its predecessor: only the tokens after it are new nodes.
            members.sort(key=lambda i: sequences[i])
            tokens, parents, depths, chains = [], [], [], []
            previous: list[int] = []
            previous_nodes: list[int] = []
            for i in members:
                ids = sequences[i]
                shared, limit = 0, min(len(ids), len(previous))
                while shared < limit and ids[shared] == previous[shared]:
                    shared += 1
                first_new, parent = len(tokens), previous_nodes[shared - 1] if shared else -1
                nodes = previous_nodes[:shared] + list(range(first_new, first_new + len(ids) - shared))
                if shared < len(ids):
                    tokens += ids[shared:]
                    depths += range(shared, len(ids))
                    parents += [parent] + nodes[shared:-1]
                located[i] = (len(trees), np.array(nodes))
                chains.append((first_new, len(ids) - shared, parent))
                previous, previous_nodes = ids, nodes
            visible = np.zeros((len(tokens), len(tokens)), dtype=bool)
            for first_new, length, parent in chains:
                # A chain of new nodes sees what its parent sees, and itself causally (a lower triangle).
                chain = slice(first_new, first_new + length)
                if parent >= 0:
                    visible[chain] = visible[parent]
                visible[chain, chain] = causal[:length, :length]
            trees.append(PrefixTree(tokens, parents, depths, visible))
    missing = [i for i, where in enumerate(located) if where is None]
    if missing:
        raise ValueError(f"Sequences {missing[:10]} belong to no group.")
    return trees, located


@torch.inference_mode()
def token_logprobs(
    model,
    sequences: list[list[int]],
    groups: list[list[int]] | None = None,
    batch_size: int = 64,
    pad_id: int = 0,
    padding_side: str = "right",
    head_chunk_elements: int | None = None,
    desc: str | None = None,
) -> list[np.ndarray]:
    """log p(ids[j+1] | ids[:j+1]) for every sequence, as float64 arrays of length len(ids) - 1.

    The sequences of a group (the options of one question) run as one prefix tree (``PrefixTree``): their
    shared prefix is computed once, and the vocabulary projection (the costliest part of a small model) runs
    once per tree node that has a next token, on real nodes only. Trees are sorted by size and batched until
    ``batch_size`` sequences, padded on ``padding_side``; each padding position attends only to itself. The
    numbers are those of each sequence run alone, whatever the grouping, batch size or padding side.
    ``use_cache=False``: every forward is a whole batch, so no KV cache is built.
    """
    trees, located = build_prefix_trees(sequences, groups)
    device = next(model.parameters()).device
    dtype = next(model.parameters()).dtype
    split = _body_and_head(model)
    # Logits in chunks of ~16 MB on a CPU (they stay in cache for the loss), ~256 MB on a GPU.
    chunk_elements = head_chunk_elements or (1 << 22 if device.type == "cpu" else 1 << 26)
    rows_per_chunk = max(1, chunk_elements // model.config.get_text_config().vocab_size)
    # log p(node's token | its ancestors) of every node of every tree, flat (a root predicts nothing: 0).
    first_node = np.cumsum([0] + [len(tree.tokens) for tree in trees])
    node_logprobs = np.zeros(first_node[-1])
    batches = _tree_batches(trees, np.bincount([t for t, _ in located], minlength=len(trees)), batch_size)
    for batch in tqdm(batches, desc=desc or "scoring", leave=False, disable=desc is None):
        width = max(len(trees[t].tokens) for t in batch)
        input_ids = np.full((len(batch), width), pad_id, dtype=np.int64)
        position_ids = np.zeros((len(batch), width), dtype=np.int64)
        visible = np.zeros((len(batch), width, width), dtype=bool)
        visible[:, np.arange(width), np.arange(width)] = True  # padding attends to itself (no empty softmax row)
        # Every non-root node is an edge: predicted from its parent's position (flat index in the batch).
        edge_parent, edge_token, edge_node = [], [], []
        for row, t in enumerate(batch):
            tree, n = trees[t], len(trees[t].tokens)
            offset = 0 if padding_side == "right" else width - n
            input_ids[row, offset : offset + n] = tree.tokens
            position_ids[row, offset : offset + n] = tree.depths
            visible[row, offset : offset + n, offset : offset + n] = tree.visible
            edge_parent += [row * width + offset + p for p in tree.parents[1:]]
            edge_token += tree.tokens[1:]
            edge_node += range(first_node[t] + 1, first_node[t] + n)
        if not edge_parent:
            continue
        mask = torch.zeros(visible.shape, dtype=dtype)[:, None].masked_fill_(
            ~torch.from_numpy(visible)[:, None], torch.finfo(dtype).min
        )
        inputs = {
            "input_ids": torch.from_numpy(input_ids).to(device),
            "position_ids": torch.from_numpy(position_ids).to(device),
            "attention_mask": mask.to(device),
            "use_cache": False,
        }
        if split is not None:
            body, project = split
            states = body(**inputs).last_hidden_state
        else:  # logits post-processed by the model: take them whole
            states, project = model(**inputs).logits, (lambda x: x)
        # The positions that predict something, once each (a parent of several children is projected once).
        predicting, first_edge, edge_row = np.unique(np.array(edge_parent), return_index=True, return_inverse=True)
        states = states.reshape(-1, states.shape[-1])[torch.from_numpy(predicting).to(device)]
        logprobs = _edge_logprobs(
            project,
            states,
            torch.from_numpy(edge_row).to(device),
            torch.tensor(edge_token, device=device),
            torch.from_numpy(first_edge).to(device),
            rows_per_chunk,
        )
        node_logprobs[edge_node] = logprobs.double().cpu().numpy()
    return [node_logprobs[first_node[t] + nodes[1:]] for t, nodes in located]


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


def _edge_logprobs(project, states, edge_row, edge_token, first_edge, rows_per_chunk: int) -> torch.Tensor:
    """log p(edge_token[e] | state edge_row[e]) for every edge, float32.

    ``states`` are the hidden states of the predicting positions; ``project`` gives their logits, in chunks
    of ``rows_per_chunk`` rows.
    ``first_edge[r]`` is an edge of state r: its token serves as cross-entropy target, because log-sum-exp
    over the vocabulary = cross-entropy + target logit, and torch's fused cross-entropy kernel is ~1.5x faster
    than torch.logsumexp on CPU (it is also what the paper's loss computes).
    """
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
    """The distinct token sequences to run, and how each option's score is read from their log-probs."""

    sequences: list[list[int]]
    # per question set, per item, per option: (sequence index, scored target mask or None, bytes)
    options: list[list[list[tuple[int, np.ndarray | None, int]]]]
    # per question item, the sequences first seen in it: they run as one prefix tree (see token_logprobs)
    groups: list[list[int]]


def plan_scoring(tokenizer, question_sets: list[QuestionSet], scoring: str) -> ScoringPlan:
    """Tokenize every filled sentence once. Identical sentences (no blank, duplicate options) share one
    sequence, so their scores are bit-identical and ties resolve to the first option as in the paper."""
    start = document_start_id(tokenizer)
    filled = [
        [[fill_blanks(item["question"], option) for option in item["options"]] for item in qs.items]
        for qs in question_sets
    ]
    texts = [text for qs in filled for item in qs for text, _ in item]
    if scoring == "option_logprob":
        if not getattr(tokenizer, "is_fast", False):
            raise ValueError("--scoring option_logprob needs a fast tokenizer (character offsets of tokens).")
        encoded = tokenizer(texts, add_special_tokens=False, return_offsets_mapping=True)
        offsets = encoded["offset_mapping"]
    else:
        encoded = tokenizer(texts, add_special_tokens=False)
        offsets = None
    sequences, index_of, options, groups, k = [], {}, [], [], 0
    for qs in filled:
        set_plan = []
        for item in qs:
            item_plan, group = [], []
            for text, spans in item:
                ids = tuple([start] + encoded["input_ids"][k])
                if ids not in index_of:
                    index_of[ids] = len(sequences)
                    sequences.append(list(ids))
                    group.append(index_of[ids])
                mask = None
                if offsets is not None:
                    # Target j (token j+1 of the sequence) is token j of the sentence.
                    mask = np.array([any(a < e and s < b for s, e in spans) for a, b in offsets[k]], dtype=bool)
                item_plan.append((index_of[ids], mask, len(text.encode("utf-8"))))
                k += 1
            set_plan.append(item_plan)
            if group:
                groups.append(group)
        options.append(set_plan)
    return ScoringPlan(sequences, options, groups)


@torch.inference_mode()
def paper_loop_losses(model, sequences: list[list[int]], desc: str | None = None) -> list[float]:
    """The paper's loss of every sequence, computed as the released loop computes it on current transformers:
    one sequence per forward pass (no batch, no padding, no prefix sharing) and
    ``CrossEntropyLoss(reduction="mean")`` on the logits in the dtype the model returns them (Qwen2 no longer
    upcasts them to float32), so bfloat16 weights give the bfloat16 loss the paper's numbers come from.

    With 16-bit weights any other shape of computation (batches, padding, a prefix tree) rounds differently, so
    this path is kept apart from token_logprobs: its results are bit-identical to the one-sentence loop."""
    device = next(model.parameters()).device
    loss = torch.nn.CrossEntropyLoss(reduction="mean")
    losses = []
    for ids in tqdm(sequences, desc=desc or "scoring", leave=False, disable=desc is None):
        input_ids = torch.tensor([ids], device=device)
        logits = model(input_ids=input_ids, use_cache=False).logits[0, :-1]
        losses.append(float(loss(logits, input_ids[0, 1:])))
    return losses


def option_score(logprobs: np.ndarray, mask: np.ndarray | None, n_bytes: int, scoring: str) -> float:
    if scoring == "mean_token_loss":
        return float(-logprobs.mean())
    if scoring == "option_logprob":
        return float(-logprobs[mask].sum())
    if scoring == "byte_normalized":
        return float(-logprobs.sum() / n_bytes)
    raise ValueError(f"Unknown scoring {scoring!r}; choose one of {', '.join(SCORINGS)}.")


def predict(scores: list[float]) -> int:
    """Index of the lowest score; ties keep option order (a stable sort, as in the paper)."""
    return min(range(len(scores)), key=lambda k: (scores[k], k))


def score_question_sets(
    model,
    tokenizer,
    question_sets: list[QuestionSet],
    scoring: str,
    batch_size: int,
    padding_side: str,
    desc=None,
    loss_dtype: str = "float32",
) -> list[list[list[float]]]:
    """Per question set, per item, the score of every option (lower is better).

    loss_dtype "float32": batched prefix trees, float32 losses. "model": the paper's loop (paper_loop_losses);
    identical sentences (no blank, duplicate options) still run once, which changes nothing: the loop gives
    them the same number."""
    if loss_dtype not in ("float32", "model"):
        raise ValueError(f"--loss_dtype must be float32 or model, got {loss_dtype!r}.")
    if loss_dtype == "model" and scoring != "mean_token_loss":
        raise ValueError(
            f"--loss_dtype model reproduces the paper's loss (--scoring mean_token_loss); got --scoring {scoring}. "
            "Use --loss_dtype float32 with the other scorings."
        )
    plan = plan_scoring(tokenizer, question_sets, scoring)
    limit = getattr(model.config, "max_position_embeddings", None)
    longest = max((len(s) for s in plan.sequences), default=0)
    if limit and longest > limit:
        raise ValueError(f"A filled question is {longest} tokens long; the model takes at most {limit}.")
    if loss_dtype == "model":
        losses = paper_loop_losses(model, plan.sequences, desc=desc)
        return [[[losses[seq] for seq, _, _ in item] for item in set_plan] for set_plan in plan.options]
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else document_start_id(tokenizer)
    logprobs = token_logprobs(model, plan.sequences, plan.groups, batch_size, pad_id, padding_side, desc=desc)
    return [
        [[option_score(logprobs[seq], mask, n_bytes, scoring) for seq, mask, n_bytes in item] for item in set_plan]
        for set_plan in plan.options
    ]


def load_model(directory: Path, dtype: str, device: torch.device, attn_implementation: str):
    model = AutoModelForCausalLM.from_pretrained(
        directory, dtype=DTYPES[dtype], attn_implementation=attn_implementation
    )
    model.config.use_cache = False
    return model.to(device).eval()


# --------------------------------------------------------------------------------------
# Probing every checkpoint, with reuse of what an output directory already holds
# --------------------------------------------------------------------------------------


def _accuracy_csv(checkpoints: list[dict]) -> str:
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(ACCURACY_CSV_COLUMNS)
    for entry in checkpoints:
        for stem, acc in entry["accuracy"].items():
            writer.writerow([entry["step"], entry["path"], stem] + [acc[key] for key in ACCURACY_CSV_COLUMNS[3:]])
    return buffer.getvalue()


ACCURACY_CSV_COLUMNS = (
    "step",
    "path",
    "questions",
    "lang",
    "correct",
    "total",
    "accuracy",
    "ties",
    "tie_rate",
    "correct_fractional",
    "accuracy_fractional",
    "ties_advantage",
)
#: Ties above this share of a file's items at a checkpoint are warned about: the first-wins rule then moves
#: the accuracy toward the share of answers at option 0 (position_bias.always_first_accuracy).
TIE_WARNING_RATE = 0.05
#: Header fields absent from outputs of earlier versions, and the value those versions used.
HEADER_DEFAULTS = {"loss_dtype": "float32"}


def item_accounting(qs: QuestionSet, set_scores: list[list[float]]) -> tuple[list[dict], dict]:
    """Per item: prediction (first-wins), correctness, tied options and fractional credit; and the set's totals."""
    rows, correct, fractional, ties = [], 0, 0.0, 0
    for item, scores in zip(qs.items, set_scores):
        prediction = predict(scores)
        tied, credit = tie_credit(scores, item["answer"])
        is_correct = prediction in item["answer"]
        correct += is_correct
        fractional += credit
        ties += tied > 1
        rows.append({"prediction": prediction, "correct": is_correct, "tied_best": tied, "credit_fractional": credit})
    total = len(qs.items)
    accuracy = {
        "lang": qs.lang,
        "correct": correct,
        "total": total,
        "accuracy": correct / total,
        "ties": ties,
        "tie_rate": ties / total,
        "correct_fractional": fractional,
        "accuracy_fractional": fractional / total,
        # What the first-wins rule gains over random tie-breaking: the part of the accuracy that ties give.
        "ties_advantage": (correct - fractional) / total,
    }
    return rows, accuracy


def _previous_results(output_dir: Path, header: dict, args: EvalArguments, checkpoints: list) -> tuple[list, dict]:
    """Checkpoint entries and prediction lines already in ``output_dir`` that can be reused (``_reusable``)."""
    accuracy_path, predictions_path = output_dir / "accuracy.json", output_dir / "predictions.jsonl"
    if args.overwrite_output_dir or not accuracy_path.is_file():
        return [], {}
    previous = json.loads(accuracy_path.read_text(encoding="utf-8"))
    differences = [
        key
        for key in ("model_name_or_path", "scoring", "dtype", "loss_dtype", "questions_sha256")
        if previous.get(key, HEADER_DEFAULTS.get(key)) != header[key]
    ]
    if differences:
        raise ValueError(
            f"{output_dir} already holds results made with a different {', '.join(differences)} "
            f"({', '.join(f'{k}={previous.get(k)!r}' for k in differences)}). Use another --output_dir or pass "
            "--overwrite_output_dir to replace them."
        )
    lines = defaultdict(list)
    if predictions_path.is_file():
        with predictions_path.open(encoding="utf-8") as handle:
            for line in handle:
                if line.strip():
                    row = json.loads(line)
                    lines[(row["step"], row["checkpoint"])].append(line.rstrip("\n"))
    expected = sum(q["items"] for q in header["questions"].values())
    # Entries of an earlier version without the tie accounting are scored again.
    entries = [
        e
        for e in previous["checkpoints"]
        if len(lines.get((e["step"], e["path"]), [])) == expected
        and all("accuracy_fractional" in acc for acc in e["accuracy"].values())
    ]
    same_run = previous.get("cpt_setting") == header["cpt_setting"]
    entries = _reusable(entries, checkpoints, args.revision, same_run, accuracy_path)
    return entries, {(e["step"], e["path"]): lines[(e["step"], e["path"])] for e in entries}


def evaluate_model(
    args: EvalArguments,
    question_sets: list[QuestionSet],
    model_name_or_path: str,
    output_dir: str | os.PathLike,
    found: tuple[list[Checkpoint], list[dict]] | None = None,
) -> dict:
    """Probe every checkpoint of ``model_name_or_path`` (``found``: find_checkpoints' answer); write and return
    accuracy.json's content."""
    output_dir = Path(output_dir)
    # 1. The checkpoints, and what is probed on them (the header of accuracy.json).
    checkpoints, skipped = found or find_checkpoints(model_name_or_path, args.revision)
    header = _probing_header(args, question_sets, model_name_or_path, checkpoints, skipped)
    # 2. Checkpoints already scored in output_dir with this header and these weights are reused.
    reused_entries, lines = _previous_results(output_dir, header, args, checkpoints)
    done = {(e["step"], e["path"]): e for e in reused_entries}
    current = {(c.step, c.path) for c in checkpoints}
    kept_only = [key for key in done if key not in current]
    if kept_only:
        logger.info("keeping %d earlier checkpoint result(s) no longer present: %s", len(kept_only), kept_only)
    todo = [c for c in checkpoints if (c.step, c.path) not in done]
    logger.info(
        "%s: %d checkpoint(s) to score, %d reused from %s", model_name_or_path, len(todo), len(done), output_dir
    )

    def write_outputs() -> dict:
        entries = sorted(done.values(), key=lambda e: (e["step"], e["path"]))
        text = "".join(line + "\n" for e in entries for line in lines[(e["step"], e["path"])])
        write_text_atomic(output_dir / "predictions.jsonl", text)
        result = {"checkpoints": entries, **header}
        write_json_atomic(output_dir / "accuracy.json", result)
        write_text_atomic(output_dir / "accuracy.csv", _accuracy_csv(entries))
        return result

    # 3. Each remaining checkpoint scored, one model in memory at a time; the outputs are rewritten after
    #    each (not before the first: a refusal leaves nothing), so a crash loses at most the one being scored.
    result = None if todo else write_outputs()
    device, tokenizer_cache = resolve_device(args.device), {}
    for checkpoint in tqdm(todo, desc="checkpoints", disable=not todo):
        directory = _materialise(checkpoint, args.revision)
        tokenizer = _tokenizer_for(args, directory, checkpoints, tokenizer_cache)
        model = load_model(directory, args.dtype, device, args.attn_implementation)
        all_scores = score_question_sets(
            model,
            tokenizer,
            question_sets,
            args.scoring,
            args.batch_size,
            args.padding_side,
            desc=f"step {checkpoint.step}",
            loss_dtype=args.loss_dtype,
        )
        del model
        key = (checkpoint.step, checkpoint.path)
        lines[key], accuracy = _checkpoint_results(checkpoint, question_sets, all_scores, header)
        weights = checkpoint_weights_sha256(checkpoint, args.revision)
        done[key] = {"step": checkpoint.step, "path": checkpoint.path, "weights_sha256": weights, "accuracy": accuracy}
        result = write_outputs()
    return result


def _probing_header(
    args: EvalArguments, question_sets: list[QuestionSet], model_name_or_path: str, checkpoints, skipped
) -> dict:
    """What is probed: the model, its CPT setting, the scoring and precision, the questions (with their quirks
    and position bias, logged). Results are reused only under the same header."""
    identity = str(Path(model_name_or_path).resolve()) if Path(model_name_or_path).is_dir() else model_name_or_path
    header = {
        "model_name_or_path": identity,
        "cpt_setting": read_cpt_setting(model_name_or_path, checkpoints),
        "scoring": args.scoring,
        "dtype": args.dtype,
        "loss_dtype": args.loss_dtype,
        "questions": {qs.stem: qs.describe() for qs in question_sets},
        "questions_sha256": hashlib.sha256(
            json.dumps(sorted((qs.stem, qs.fingerprint) for qs in question_sets)).encode()
        ).hexdigest(),
        "quirk_counts": {qs.stem: {reason: len(ix) for reason, ix in qs.quirks.items()} for qs in question_sets},
        "skipped_checkpoints": skipped,
    }
    for entry in skipped:
        logger.warning("skipped %s: %s", entry["path"], entry["reason"])
    for stem, described in header["questions"].items():
        bias = described["position_bias"]
        logger.info(
            "position bias of %s: answer position shares %s; always option 0: accuracy %.3f (chance %.3f)",
            stem,
            ", ".join(f"{k}: {v:.2f}" for k, v in bias["answer_position_share"].items()),
            bias["always_first_accuracy"],
            described["chance_accuracy"],
        )
    return header


def _checkpoint_results(
    checkpoint: Checkpoint, question_sets: list[QuestionSet], all_scores, header: dict
) -> tuple[list[str], dict]:
    """The predictions.jsonl lines of one scored checkpoint and its accuracy entry (warning on many ties)."""
    rows, accuracy = [], {}
    for qs, set_scores in zip(question_sets, all_scores):
        items, accuracy[qs.stem] = item_accounting(qs, set_scores)
        for index, (item, scores, accounted) in enumerate(zip(qs.items, set_scores, items)):
            row = {
                "questions": qs.stem,
                "lang": qs.lang,
                "index": index,
                "step": checkpoint.step,
                "checkpoint": checkpoint.path,
                "scores": scores,
                "prediction": accounted["prediction"],
                "answer": item["answer"],
                "correct": accounted["correct"],
                "tied_best": accounted["tied_best"],
                "credit_fractional": accounted["credit_fractional"],
            }
            rows.append(json.dumps(row, ensure_ascii=False))
        acc = accuracy[qs.stem]
        if acc["tie_rate"] > TIE_WARNING_RATE:
            logger.warning(
                "step %d, %s: %d of %d items (%.1f%%) tie for the best score; accuracy %.3f under the paper's "
                "first-wins rule, %.3f with ties broken at random (always option 0 would score %.3f)",
                checkpoint.step,
                qs.stem,
                acc["ties"],
                acc["total"],
                100 * acc["tie_rate"],
                acc["accuracy"],
                acc["accuracy_fractional"],
                header["questions"][qs.stem]["position_bias"]["always_first_accuracy"],
            )
    summary = ", ".join(
        f"{stem} {acc['accuracy']:.3f} (fractional {acc['accuracy_fractional']:.3f}, ties {acc['ties']})"
        for stem, acc in accuracy.items()
    )
    logger.info("step %d (%s): %s", checkpoint.step, checkpoint.path, summary)
    return rows, accuracy


def _tokenizer_source(args: EvalArguments, directory: Path, checkpoints: list[Checkpoint]) -> str:
    if args.tokenizer_name_or_path:
        return args.tokenizer_name_or_path
    if _has_tokenizer(directory):
        return str(directory)
    # Checkpoints without tokenizer files use the run's (its root, i.e. the final model's folder).
    candidates = [directory.parent] + [c.local_dir for c in checkpoints if c.local_dir is not None]
    source = next((str(c) for c in candidates if _has_tokenizer(c)), None)
    if source is None:
        raise FileNotFoundError(f"{directory}: no tokenizer files here or in the run; pass --tokenizer_name_or_path.")
    return source


def _tokenizer_for(args: EvalArguments, directory: Path, checkpoints: list[Checkpoint], cache: dict):
    source = _tokenizer_source(args, directory, checkpoints)
    if source not in cache:
        cache[source] = AutoTokenizer.from_pretrained(source)
    return cache[source]


# --------------------------------------------------------------------------------------
# Bridge diagnostic: does the English side of a pair help predict the target side?
# --------------------------------------------------------------------------------------


def read_pairs(path: str, max_pairs: int | None = None) -> list[tuple[str, str]]:
    """(en, tgt) pairs from a .jsonl/.json file with 'en' and 'tgt' columns, or a save_to_disk dataset."""
    source = Path(path)
    if source.is_dir():
        from datasets import load_from_disk

        dataset = load_from_disk(str(source))
        if "kind" in dataset.column_names:
            dataset = dataset.filter(lambda kind: kind == "pair", input_columns="kind")
        missing = {"en", "tgt"} - set(dataset.column_names)
        if missing:
            raise ValueError(f"{source}: no {sorted(missing)} column(s) (found {dataset.column_names}).")
        pairs = list(zip(dataset["en"], dataset["tgt"]))
    else:
        # the columns are fixed (no flag names them): a missing one is asked for by name
        en_sides = read_documents(source, "en", column_flag=None)
        pairs = list(zip(en_sides, read_documents(source, "tgt", column_flag=None)))
    pairs = pairs[:max_pairs] if max_pairs else pairs
    if len(pairs) < 2:
        raise ValueError(f"{path}: the bridge diagnostic needs at least 2 pairs (found {len(pairs)}).")
    empty = [i for i, (en, tgt) in enumerate(pairs) if not en.strip() or not tgt.strip()]
    if empty:
        raise ValueError(f"{path}: pairs {empty[:10]} have an empty 'en' or 'tgt' side.")
    return pairs


def bridged_pair(first: list[int], second: list[int], start: int, separator_ids: list[int]) -> list[int]:
    """One bridged pair, as run_cpt.py packs it: its two segments (pair_segments) adjacent, positions continuing."""
    return [token for segment in pair_segments(first, second, start, separator_ids) for token in segment]


def bridge_diagnostic_losses(
    model,
    tokenizer,
    pairs: list[tuple[str, str]],
    batch_size: int = 64,
    separator: str = "",
    pair_order: str = "en_first",
    seed: int = 0,
) -> dict:
    """Mean token loss of the second side of each pair (token-weighted over all pairs) in three contexts.

    Pair i is laid out as run_cpt.py lays out a bridged pair: study_common's ``pair_first_side(i, pair_order,
    seed)`` (held-out pairs have no pair id, their index serves) picks the first side, the context; the other
    side is scored. alone: ``[start] + scored``; after_own_context: ``pair_segments(first_i, scored_i)`` joined,
    ``[start] + first_i + separator + [start] + scored_i`` (positions continuing), loss over the scored tokens
    only; after_mismatched_context: the same with pair (i+1) mod n's side in the language of first_i (a
    derangement).
    The same scored tokens are counted in all three. With en_first (English context, target scored) the two
    context entries are also written under their historical names after_own_english / after_mismatched_english.
    """
    start = document_start_id(tokenizer)
    separator_ids = tokenizer(separator, add_special_tokens=False)["input_ids"] if separator else []
    n = len(pairs)
    side_ids = {
        side: tokenizer([pair[k] for pair in pairs], add_special_tokens=False)["input_ids"]
        for k, side in enumerate(("en", "tgt"))
    }
    first = [pair_first_side(i, pair_order, seed) for i in range(n)]
    second = ["tgt" if side == "en" else "en" for side in first]
    scored = [side_ids[second[i]][i] for i in range(n)]

    sequences = [[start] + scored[i] for i in range(n)]
    sequences += [bridged_pair(side_ids[first[i]][i], scored[i], start, separator_ids) for i in range(n)]
    sequences += [bridged_pair(side_ids[first[i]][(i + 1) % n], scored[i], start, separator_ids) for i in range(n)]
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else start
    # Each scored side alone is its own tree; pair i's own context is pair i-1's mismatched context when both
    # put the same language first: one tree.
    groups = [[i] for i in range(n)]
    for i in range(n):
        previous = (i - 1) % n
        if first[previous] == first[i]:
            groups.append([n + i, 2 * n + previous])
        else:
            groups += [[n + i], [2 * n + previous]]
    logprobs = token_logprobs(model, sequences, groups, batch_size, pad_id)
    tokens = sum(len(ids) for ids in scored)

    def mean_loss(block: int) -> float:
        return float(-sum(logprobs[block * n + i][-len(scored[i]) :].sum() for i in range(n)) / tokens)

    losses = {"alone": mean_loss(0), "after_own_context": mean_loss(1), "after_mismatched_context": mean_loss(2)}
    if all(side == "en" for side in first):
        losses["after_own_english"] = losses["after_own_context"]
        losses["after_mismatched_english"] = losses["after_mismatched_context"]
    losses["context_sides"] = {side: first.count(side) for side in ("en", "tgt")}
    losses["scored_sides"] = {side: second.count(side) for side in ("en", "tgt")}
    return losses


def run_bridge_diagnostic(args: EvalArguments, model_name_or_path: str, output_dir, found=None) -> dict:
    output_dir = Path(output_dir)
    pairs = read_pairs(args.diagnostic_pairs, args.diagnostic_max_pairs)
    checkpoints, _ = found or find_checkpoints(model_name_or_path, args.revision)
    # The pairs are laid out as the run laid out its own: its separator after the first side
    # (run_cpt.py --pair_separator) and its --pair_order (en_first when the model records none, run_cpt's default).
    setting = read_cpt_setting(model_name_or_path, checkpoints) or {}
    separator = setting.get("pair_separator") or ""
    pair_order = setting.get("pair_order") or "en_first"
    seed = int(setting.get("seed") or 0)
    sides = [pair_first_side(i, pair_order, seed) for i in range(len(pairs))]
    header = {
        "pairs_file": str(Path(args.diagnostic_pairs).resolve()),
        "pairs_sha256": hashlib.sha256(json.dumps(pairs, ensure_ascii=False).encode()).hexdigest(),
        "pair_separator": separator,
        "pair_order": pair_order,
        "pair_order_seed": seed,
        # The side of each pair that is context (first) and the side that is scored (second), as the run saw them.
        "context_side": sides[0] if len(set(sides)) == 1 else "per pair (seeded coin)",
        "scored_side": ({"en": "tgt", "tgt": "en"}[sides[0]]) if len(set(sides)) == 1 else "per pair (seeded coin)",
        "dtype": args.dtype,
        "cpt_setting": setting or None,
    }
    logger.info(
        "bridge diagnostic: pair_order %s (seed %d): context side %s, scored side %s",
        pair_order,
        seed,
        header["context_side"],
        header["scored_side"],
    )
    path = output_dir / "bridge_diagnostic.json"
    done = {}
    if path.is_file() and not args.overwrite_output_dir:
        previous = json.loads(path.read_text(encoding="utf-8"))
        if all(previous.get(k) == v for k, v in header.items()):
            reusable = _reusable(previous["checkpoints"], checkpoints, args.revision, True, path)
            done = {(e["step"], e["path"]): e for e in reusable}
    device, cache = resolve_device(args.device), {}
    todo = [c for c in checkpoints if (c.step, c.path) not in done]
    for checkpoint in tqdm(todo, desc="bridge diagnostic", disable=not todo):
        directory = _materialise(checkpoint, args.revision)
        tokenizer = _tokenizer_for(args, directory, checkpoints, cache)
        model = load_model(directory, args.dtype, device, args.attn_implementation)
        losses = bridge_diagnostic_losses(model, tokenizer, pairs, args.batch_size, separator, pair_order, seed)
        done[(checkpoint.step, checkpoint.path)] = {
            "step": checkpoint.step,
            "path": checkpoint.path,
            "weights_sha256": checkpoint_weights_sha256(checkpoint, args.revision),
            **losses,
            "pairs": len(pairs),
        }
        logger.info("bridge diagnostic step %d: %s", checkpoint.step, losses)
        result = {"checkpoints": sorted(done.values(), key=lambda e: (e["step"], e["path"])), **header}
        write_json_atomic(path, result)
    if not todo:
        result = {"checkpoints": sorted(done.values(), key=lambda e: (e["step"], e["path"])), **header}
        write_json_atomic(path, result)
    return result


# --------------------------------------------------------------------------------------
# Manipulation checks: name alignment outside the bridge, retention and learning per fact tier
# --------------------------------------------------------------------------------------


def _read_json_file(path: str, flag: str):
    try:
        return json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as err:
        raise InputError(f"{flag} {path}: cannot read it as JSON ({err}).") from err


def read_name_alignment(path: str) -> dict:
    """A world's name_alignment.json, checked (errors name the file and the item), plus ``forms``: each entity's
    names as written mid-sentence, per side ("en", "target"): with a leading space when that language's frames put
    a space before the blank (a byte-level BPE folds it into the name's first token), else bare."""
    data = _read_json_file(path, "--name_alignment")
    if not isinstance(data, dict) or not {"lang", "entities", "items"} <= set(data):
        raise InputError(f"{path}: needs 'lang', 'entities' and 'items' (synthetic_world.py's name_alignment.json).")
    entities = {e.get("id"): e for e in data["entities"] if isinstance(e, dict)}
    if len(entities) < len(data["entities"]) or not all(
        isinstance(e.get(f), str) and e[f].strip() for e in entities.values() for f in ("id", "en", "target")
    ):
        raise InputError(f"{path}: every entity needs its own 'id' and non-empty 'en' and 'target' names.")
    side_of = {f"en->{data['lang']}": "target", f"{data['lang']}->en": "en"}  # the side the options name
    spaced = {"en": False, "target": False}
    for k, item in enumerate(data["items"]):
        item = item if isinstance(item, dict) else {}
        at = f"{path} item {k} (entity {item.get('entity')!r}, {item.get('direction')})"
        blanks = list(BLANK.finditer(str(item.get("frame", ""))))
        options = item.get("options")
        if (
            item.get("direction") not in side_of
            or item.get("entity") not in entities
            or not isinstance(item.get("context"), str)
        ):
            raise InputError(f"{at}: needs a direction among {list(side_of)}, a listed entity and a context.")
        if len(blanks) != 1:
            raise InputError(f"{at}: the frame needs exactly one blank (____); it has {len(blanks)}.")
        if not isinstance(options, list) or len(options) < 2 or len(set(options)) < len(options):
            raise InputError(f"{at}: 'options' must list at least 2 distinct names.")
        if item.get("answer") not in options:
            raise InputError(f"{at}: the answer {item.get('answer')!r} is not among its options {options}.")
        if item["answer"] != entities[item["entity"]][side_of[item["direction"]]]:
            raise InputError(f"{at}: the answer {item['answer']!r} is not the entity's name on that side.")
        spaced[side_of[item["direction"]]] |= item["frame"][: blanks[0].start()][-1:].isspace()
    forms = {side: [" " * spaced[side] + e[side] for e in entities.values()] for side in spaced}
    return {**data, "forms": forms, "spaced": spaced}


def name_alignment_accuracy(model, tokenizer, alignment: dict, separator: str = "", batch_size: int = 64) -> dict:
    """Per direction, the accuracy of choosing an entity's name given a held-out sentence naming it in the other
    language: each option is scored as a bridged pair, ``bridged_pair(context, filled frame)`` (``[start] +
    context + separator + [start] + frame``), by the mean token loss of the frame's tokens; the lowest wins, ties
    go to the first option (the cloze's rule). chance: the mean of 1/options (0.25 for 4)."""
    start = document_start_id(tokenizer)
    separator_ids = tokenizer(separator, add_special_tokens=False)["input_ids"] if separator else []
    items = alignment["items"]
    contexts = tokenizer([item["context"] for item in items], add_special_tokens=False)["input_ids"]
    filled = [fill_blanks(item["frame"], option)[0] for item in items for option in item["options"]]
    frames = iter(tokenizer(filled, add_special_tokens=False)["input_ids"])
    sequences, groups = [], []
    for item, context in zip(items, contexts):
        groups.append(list(range(len(sequences), len(sequences) + len(item["options"]))))  # one prefix tree
        sequences += [(bridged_pair(context, frame, start, separator_ids), len(frame)) for frame in
                      (next(frames) for _ in item["options"])]  # fmt: skip
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else start
    logprobs = token_logprobs(model, [ids for ids, _ in sequences], groups, batch_size, pad_id)
    hits, chance = defaultdict(list), defaultdict(list)
    for item, group in zip(items, groups):
        scores = [float(-logprobs[s][-sequences[s][1] :].mean()) for s in group]
        hits[item["direction"]].append(item["options"][predict(scores)] == item["answer"])
        chance[item["direction"]].append(1 / len(item["options"]))
    return {
        d: {"accuracy": float(np.mean(h)), "n": len(h), "chance": float(np.mean(chance[d]))} for d, h in hits.items()
    }


def embedding_match(model, tokenizer, alignment: dict) -> dict:
    """Whether each entity's two names are nearest neighbours in the input embeddings. A name's vector: the mean
    input embedding of its tokens (``alignment["forms"]``, as written mid-sentence). ``en-><lang>``: given entity
    i's English name, the target name of highest cosine similarity among all entities' is entity i's;
    ``<lang>->en``: given its target name, among all English names. Ties go to the first entity; chance 1/n."""
    table = model.get_input_embeddings().weight.detach().float().cpu().numpy()

    def unit_vectors(names: list[str]) -> np.ndarray:
        vectors = np.stack([table[ids].mean(0) for ids in tokenizer(names, add_special_tokens=False)["input_ids"]])
        return vectors / np.maximum(np.linalg.norm(vectors, axis=1, keepdims=True), 1e-12)

    similarity = unit_vectors(alignment["forms"]["en"]) @ unit_vectors(alignment["forms"]["target"]).T
    n, lang, own = len(similarity), alignment["lang"], np.arange(len(similarity))
    hits = {f"en->{lang}": similarity.argmax(1) == own, f"{lang}->en": similarity.argmax(0) == own}
    return {d: {"accuracy": float(h.mean()), "n": n, "chance": 1 / n} for d, h in hits.items()}


def read_item_tiers(path: str, question_sets: list[QuestionSet]) -> dict:
    """A world's item_tiers.json, checked against the question files of its parallel group (``stems``):
    ``tier_of[i]`` is the tier of item i of each."""
    data = _read_json_file(path, "--item_tiers")
    if not isinstance(data, dict) or not isinstance(data.get("tiers"), dict) or not isinstance(data.get("items"), list):
        raise InputError(f"{path}: needs 'parallel_group', 'tiers' and 'items' (synthetic_world.py's item_tiers.json).")
    sets = [qs for qs in question_sets if qs.base == data.get("parallel_group")]
    if not sets:
        loaded = sorted({qs.base for qs in question_sets})
        raise InputError(f"{path}: parallel_group {data.get('parallel_group')!r} is none of the questions' {loaded}.")
    tier_of = [None] * len(sets[0].items)
    for k, record in enumerate(data["items"]):
        index, tier = (record.get("index"), record.get("tier")) if isinstance(record, dict) else (None, None)
        if not isinstance(index, int) or not 0 <= index < len(tier_of) or tier_of[index] or tier not in data["tiers"]:
            raise InputError(f"{path} item {k}: index {index!r} is not a new question index or tier {tier!r} unknown.")
        tier_of[index] = tier
    if None in tier_of:
        raise InputError(f"{path}: no tier for question items {[i for i, t in enumerate(tier_of) if t is None][:10]}.")
    counts = {tier: tier_of.count(tier) for tier in data["tiers"] if tier in tier_of}
    describe = {"file": str(Path(path).resolve()), "parallel_group": data["parallel_group"], "items_per_tier": counts}
    return {"describe": describe | {"meaning": data["tiers"]}, "stems": [qs.stem for qs in sets], "tier_of": tier_of}


def run_manipulation_checks(args: EvalArguments, model_name_or_path: str, output_dir, found, alignment, tiers) -> dict:
    """manipulation_checks.json: per checkpoint, name_alignment and embedding_match (with --name_alignment; reused
    as accuracy.json's entries are, by weights) and tier_accuracy (with --item_tiers, from predictions.jsonl)."""
    output_dir, (checkpoints, _) = Path(output_dir), found
    setting = read_cpt_setting(model_name_or_path, checkpoints)
    separator = (setting or {}).get("pair_separator") or ""
    identity = str(Path(model_name_or_path).resolve()) if Path(model_name_or_path).is_dir() else model_name_or_path
    header = {
        "model_name_or_path": identity, "cpt_setting": setting, "dtype": args.dtype, "pair_separator": separator,
        "name_alignment": alignment and {
            "file": str(Path(args.name_alignment).resolve()),
            "sha256": hashlib.sha256(json.dumps(alignment["items"], ensure_ascii=False).encode()).hexdigest(),
            "lang": alignment["lang"], "variant": alignment.get("variant"), "entities": len(alignment["entities"]),
            "layout": "[start] + context + pair_separator + [start] + filled frame; mean loss of the frame's tokens",
            "name_leading_space": alignment["spaced"],
        },
        "item_tiers": tiers and tiers["describe"],
    }  # fmt: skip
    path, done = output_dir / "manipulation_checks.json", {}
    if alignment and path.is_file() and not args.overwrite_output_dir:
        previous = json.loads(path.read_text(encoding="utf-8"))
        if all(previous.get(k) == v for k, v in header.items() if k != "item_tiers"):
            reusable = _reusable(previous["checkpoints"], checkpoints, args.revision, True, path)
            done = {(e["step"], e["path"]): e for e in reusable}
    correct = read_predictions(output_dir)[1] if tiers else {}
    device, cache = resolve_device(args.device), {}
    for checkpoint in tqdm(checkpoints, desc="manipulation checks"):
        key, previous = (checkpoint.step, checkpoint.path), done.get((checkpoint.step, checkpoint.path), {})
        entry = {"step": key[0], "path": key[1], "weights_sha256": checkpoint_weights_sha256(checkpoint, args.revision)}
        entry |= {k: previous[k] for k in ("name_alignment", "embedding_match") if k in previous}
        if alignment and "name_alignment" not in entry:
            directory = _materialise(checkpoint, args.revision)
            tokenizer = _tokenizer_for(args, directory, checkpoints, cache)
            model = load_model(directory, args.dtype, device, args.attn_implementation)
            entry["name_alignment"] = name_alignment_accuracy(model, tokenizer, alignment, separator, args.batch_size)
            entry["embedding_match"] = embedding_match(model, tokenizer, alignment)
            logger.info("manipulation checks step %d: %s", key[0], {k: entry[k] for k in list(entry)[3:]})
        done[key] = entry
        if tiers and all(key[0] in correct[stem] for stem in tiers["stems"]):
            tier_of, names = np.array(tiers["tier_of"]), tiers["describe"]["items_per_tier"]
            entry["tier_accuracy"] = {
                stem: {t: float(correct[stem][key[0]][tier_of == t].mean()) for t in names} for stem in tiers["stems"]
            }
        result = {"checkpoints": sorted(done.values(), key=lambda e: (e["step"], e["path"])), **header}
        write_json_atomic(path, result)
    return result


# --------------------------------------------------------------------------------------
# Main
# --------------------------------------------------------------------------------------


class _HelpFormatter(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    """Defaults after each option, and the module docstring (scorings, outputs) kept as written."""


def parse_arguments(argv: list[str] | None, require_model: bool = True) -> EvalArguments:
    """The probing flags, checked. run_transfer.py parses the flags it passes on with ``require_model=False``
    (its runs are the models)."""
    parser = HfArgumentParser(EvalArguments, description=__doc__, formatter_class=_HelpFormatter)
    (args,) = parser.parse_args_into_dataclasses(args=argv)
    if require_model and not args.model_name_or_path:
        parser.error("nothing to do: pass --model_name_or_path (to compare runs: run_transfer.py)")
    if require_model and not args.questions and not args.diagnostic_pairs and not args.name_alignment:
        parser.error("pass --questions (and/or --diagnostic_pairs, --name_alignment)")
    if args.item_tiers and not args.questions:
        parser.error("--item_tiers gives the tiers of --questions items: pass the questions too")
    if args.loss_dtype == "model" and args.scoring != "mean_token_loss":
        parser.error("--loss_dtype model reproduces the paper's loss: it needs --scoring mean_token_loss")
    if args.batch_size < 1:
        parser.error("--batch_size must be >= 1")
    return args


def main(argv: list[str] | None = None) -> None:
    # 1. Arguments and logging.
    args = parse_arguments(argv)
    setup_logging()
    # 2. The inputs, validated before anything is written: the questions (--strict: their quirks are errors), the
    #    name alignment items and the fact tiers; the checkpoints, each with a tokenizer.
    question_sets = (
        load_question_sets(args.questions, args.question_langs, args.strict, args.revision) if args.questions else []
    )
    alignment = read_name_alignment(args.name_alignment) if args.name_alignment else None
    tiers = read_item_tiers(args.item_tiers, question_sets) if args.item_tiers else None
    found = find_checkpoints(args.model_name_or_path, args.revision)
    for checkpoint in (c for c in found[0] if c.local_dir is not None):  # the Hub's are known once downloaded
        _tokenizer_source(args, checkpoint.local_dir, found[0])
    # 3. Probing: every checkpoint scored on every question set (finished checkpoints reused).
    if question_sets:
        result = evaluate_model(args, question_sets, args.model_name_or_path, args.output_dir, found)
        quirks = {qs.stem: {k: len(v) for k, v in qs.quirks.items()} for qs in question_sets if qs.quirks}
        logger.info(
            "%d checkpoint(s) in %s; quirks counted: %s", len(result["checkpoints"]), args.output_dir, quirks or "none"
        )
    # 4. The bridge diagnostic on held-out pairs.
    if args.diagnostic_pairs:
        run_bridge_diagnostic(args, args.model_name_or_path, args.output_dir, found)
    # 5. The manipulation checks.
    if alignment or tiers:
        run_manipulation_checks(args, args.model_name_or_path, args.output_dir, found, alignment, tiers)


if __name__ == "__main__":
    exit_on_input_error(main)
