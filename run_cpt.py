#!/usr/bin/env python
# /// script
# requires-python = ">=3.10"
# dependencies = ["torch==2.13.0", "transformers>=5.0", "accelerate>=1.10", "datasets>=4.0", "numpy>=2.0", "huggingface-hub>=1.0"]
# ///
"""Continual pretraining on one language, WITH, WITHOUT or with MISMATCHED bridges (step 2b of the study).

Needs study_common.py and train_common.py beside it (the packing and collation section below needs only torch).

    accelerate launch run_cpt.py --lang bo --bridges
    accelerate launch run_cpt.py --model_name_or_path BASE --dataset_path DATA --lang bo --bridges \\
        --block_size 2048 --output_dir runs/cpt-bo-bridges --max_steps 1500 --save_steps 100

continues a base model (run_pretrain.py output, local or Hub; default ``runs/pretrain``, where
run_pretrain.py saves by default) on the dataset of build_pairs.py (``--dataset_path`` save_to_disk
dir, default ``runs/data-<lang>`` where ``build_pairs.py --lang <lang>`` writes by default, or
``--dataset_name`` Hub dataset pushed by build_pairs.py). ``--output_dir`` defaults to
``runs/cpt-<lang>-<setting>-seed<seed>``, so the settings never share a folder. Exactly one of
``--bridges``, ``--no_bridges`` and ``--mismatched_bridges`` must be given. The settings train on
exactly the same documents, the same tokens and the same number of windows and steps; they differ
only in whether the two halves of each parallel pair share a context window (and so attend to each
other), or (mismatched, the control) each first half shares one with another pair's second half. How
that is guaranteed is documented in ``plan_packing`` and ``BridgePackingCollator`` below; the run
proves it at start in ``packing_audit.json`` (and raises if it does not hold), and
``--dump_packing FILE`` writes every trained window for an independent check.

Paper defaults: 1,500 steps of 0.5M tokens, i.e. ``--block_size 2048`` and 256 windows per step
(``per_device_train_batch_size x processes x gradient_accumulation_steps = 256``, e.g. 8 x 8 x 4),
``--max_steps 1500``.

Resuming: ``--resume_from_checkpoint PATH`` or ``latest`` (train_common.RESUME_HELP), only from a
checkpoint of the same setting, base model, data and plan (``check_resume_setting``); an
``--output_dir`` that already holds a checkpoint is refused without it.

Outputs in --output_dir: checkpoint-N/ every --save_steps (a learning curve), the final model and
tokenizer, packing_audit.json, the setting in config.json (``cpt_setting``), in trainer_state.json
(``stateful_callbacks.CPTSettingCallback``) and in the run name (default ``cpt-<lang>-<setting>-seed<seed>``),
and a model card (README.md, also the one pushed with --push_to_hub).
"""

from __future__ import annotations

import bisect
import hashlib
import heapq
import itertools
import json
import logging
import math
import os
import random
import sys
from collections import Counter
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import NamedTuple

import datasets
import numpy as np
import torch
from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
    HfArgumentParser,
    Trainer,
    TrainerCallback,
    TrainingArguments,
    set_seed,
)
from transformers.trainer_callback import ExportableState

from study_common import (
    DEFAULT_BASE_MODEL_DIR,
    PAIR_ORDERS,
    RUNS_DIR,
    WEIGHT_FILES,
    InputError,
    default_cpt_data_dir,
    default_cpt_run_name,
    document_start_id,
    exit_on_input_error,
    local_weight_digests,
    output_dir_given,
    pair_first_side,
    pair_segments,
    setup_logging,
    weights_sha256,
    write_json_atomic,
)
from train_common import (
    ModelCard,
    ModelCardMixin,
    autocast_dtype,
    check_attention_implementation_trains_on,
    check_document_isolation,
    document_resume_flag,
    finish_training,
    guard_flash_attention_inputs,
    isolation_failure,
    resume_checkpoint,
    use_cpu_backend_without_gpu,
)

logger = logging.getLogger("run_cpt")

# ======================================================================================
# Bridge-aware packing: planning (pure Python) and collation (torch). This section is
# self-contained: copy it, from PackingUnit to the end of BridgePackingCollator, into another
# project as it is, with these imports:
#   from __future__ import annotations
#   import bisect, heapq, itertools, math, random
#   from collections import Counter
#   from collections.abc import Callable, Iterable, Iterator, Sequence
#   from dataclasses import dataclass
#   from typing import NamedTuple
#   import torch
# and, for kernels other than sdpa/eager (flash: one flattened row), train_common.py beside it.
# ======================================================================================

# ---- Planning: which documents share each window (pure Python) --------------------------


class PackingUnit(NamedTuple):
    """One record of the CPT dataset, as the packer sees it.

    key              hashable, unique within one pass over the data (e.g. the dataset row)
    segment_lengths  token count of each of its segments (each segment is ``[start] + tokens``)
    is_pair          True for a parallel pair: exactly two segments, first side and second side
    group            pairs are given mismatched partners only within their group: run_cpt.py puts the
                     pair's first side here, so that the first segment of one pair and the second of another
                     are an English and a target half, laid out as a bridged pair's
    """

    key: object
    segment_lengths: tuple[int, ...]
    is_pair: bool
    group: object = None


#: The CPT settings, as ``cpt_setting["setting"]`` records them. Each lays a parallel pair out its own way
#: (``SettingDocuments``); the other documents are the same in all three.
SETTINGS = ("bridges", "no_bridges", "mismatched_bridges")


def unit_documents(unit: PackingUnit, bridges: bool) -> list[tuple[int, tuple, tuple]]:
    """(length, segments, pair_keys) of each document of ``unit`` with or without bridges; a segment is
    ``(key, part)``.

    ``pair_keys`` names the pairs with a half in the document: no other half of them may share its window."""
    lengths = unit.segment_lengths
    if unit.is_pair:
        if len(lengths) != 2:
            raise ValueError(f"pair {unit.key!r} has {len(lengths)} segments, expected 2")
        if bridges:
            return [(lengths[0] + lengths[1], ((unit.key, 0), (unit.key, 1)), ())]
        return [
            (lengths[0], ((unit.key, 0),), (unit.key,)),
            (lengths[1], ((unit.key, 1),), (unit.key,)),
        ]
    return [(length, ((unit.key, part),), ()) for part, length in enumerate(lengths)]


def mismatched_partners(cycle: list[PackingUnit]) -> list[PackingUnit]:
    """The derangement of mismatched bridges: each pair of a cycle gives its first half to the next pair's
    second half, cyclically (a cycle holds 2 or 3 distinct pairs, so no pair is its own partner)."""
    return cycle[1:] + cycle[:1]


class SettingDocuments:
    """The documents of one setting, unit after unit of the stream (``unit_documents``).

    ``mismatched_bridges``: pairs wait, per pass and ``group`` (``group_sizes``: pairs per group in one
    pass), until two have come (three at the end of a pass over an odd number); then each pair's first
    segment and its partner's second segment (``mismatched_partners``) form one document, laid out as a
    bridged pair's, with both pairs in its ``pair_keys``. ``waiting``: a pair waits for its partner (a
    stream may not end there). ``partners``: pair key -> the key of the pair whose second segment it got.
    """

    def __init__(self, setting: str, group_sizes: Counter):
        if setting not in SETTINGS:
            raise ValueError(f"setting must be one of {', '.join(SETTINGS)}, got {setting!r}")
        self.setting, self.group_sizes = setting, group_sizes
        self._waiting: dict[object, list[PackingUnit]] = {}
        self._taken: Counter = Counter()  # (pass, group) -> pairs come
        self.partners: dict = {}

    @property
    def waiting(self) -> bool:
        return any(self._waiting.values())

    def __call__(self, unit: PackingUnit) -> list[tuple[int, tuple, tuple]]:
        if self.setting != "mismatched_bridges" or not unit.is_pair:
            return unit_documents(unit, self.setting != "no_bridges")
        waiting = self._waiting.setdefault(unit.group, [])
        waiting.append(unit)
        self._taken[unit.key[0], unit.group] += 1
        left = self.group_sizes[unit.group] - self._taken[unit.key[0], unit.group]
        if len(waiting) < 2 or (len(waiting) == 2 and left == 1):
            return []
        self._waiting[unit.group] = []
        documents = []
        for pair, partner in zip(waiting, mismatched_partners(waiting)):
            self.partners[pair.key] = partner.key
            length = pair.segment_lengths[0] + partner.segment_lengths[1]
            documents.append((length, ((pair.key, 0), (partner.key, 1)), (pair.key, partner.key)))
        return documents


def pair_group_sizes(units: Iterable[PackingUnit]) -> Counter:
    """Pairs per ``group`` in ``units`` (one pass)."""
    return Counter(unit.group for unit in units if unit.is_pair)


def mismatched_unavailable(units: Sequence[PackingUnit], block_size: int) -> str | None:
    """Why ``units`` cannot be planned with mismatched bridges (None: they can).

    Every group needs two pairs, and any first segment of a group must fit one window with any second."""
    if not any(unit.is_pair for unit in units):
        return "no parallel pair"
    for group in pair_group_sizes(units):
        lengths = [unit.segment_lengths for unit in units if unit.is_pair and unit.group == group]
        first, second = (max(length[part] for length in lengths) for part in (0, 1))
        which = "pairs" if group is None else f"pairs with {group} first"
        if len(lengths) < 2:
            return f"only one of the {which}: it has no other pair to be mismatched with"
        if first + second > block_size:
            return (
                f"the longest first half ({first} tokens) and the longest second half ({second}) of the {which} "
                f"would not fit one window of {block_size} tokens together"
            )
    return None


class _BestFit:
    """Online best fit over at most ``max_open`` open windows.

    A document goes into the open window with the least free space that still fits it (ties: the
    earliest opened), skipping any window that holds another half of its pairs (``pair_keys``).
    When nothing fits, a new window opens; if ``max_open`` are open, the fullest one is closed
    first. A window that is exactly full closes at once. The result is a pure function of the
    documents, their order, ``block_size`` and ``max_open``; its lookahead (and working memory) is
    the open windows. ``keep_windows=False`` only counts them (what ``plan_packing`` needs per unit).
    """

    def __init__(self, block_size: int, max_open: int, keep_windows: bool = True):
        if block_size < 2:
            raise ValueError(f"block_size must be at least 2, got {block_size}")
        if max_open < 1:
            raise ValueError(f"max_open_windows must be at least 1, got {max_open}")
        self.block_size, self.max_open, self.keep_windows = (
            block_size,
            max_open,
            keep_windows,
        )
        self.closed: list[list[tuple]] = []
        self.closed_count = 0
        self._open: dict[int, _OpenWindow] = {}  # by serial: the order windows were opened in
        self._by_space: list[tuple[int, int]] = []  # sorted (free space, serial)
        self._next_serial = 0

    @property
    def window_count(self) -> int:
        """Windows needed if the stream ended now (closed + open)."""
        return self.closed_count + len(self._open)

    def _close(self, serial: int) -> None:
        documents = self._open.pop(serial).documents
        self.closed_count += 1
        if self.keep_windows:
            self.closed.append(documents)

    def add(self, length: int, segments: tuple, pair_keys: tuple) -> None:
        if length > self.block_size:
            raise ValueError(f"a document of {length} tokens cannot fit a window of {self.block_size}")
        position = bisect.bisect_left(self._by_space, (length, -1))
        while position < len(self._by_space):
            serial = self._by_space[position][1]
            window = self._open[serial]
            if window.pair_keys.isdisjoint(pair_keys):
                del self._by_space[position]
                break
            position += 1
        else:
            if len(self._open) >= self.max_open:
                self._close(self._by_space.pop(0)[1])  # the fullest window (least free space)
            serial = self._next_serial
            self._next_serial += 1
            window = self._open[serial] = _OpenWindow(self.block_size, [], set())
        window.free -= length
        window.documents.append(segments)
        window.pair_keys.update(pair_keys)
        if window.free == 0:
            self._close(serial)
        else:
            bisect.insort(self._by_space, (window.free, serial))

    def finish(self) -> list[list[tuple]]:
        for serial in sorted(self._open):
            self._close(serial)
        return self.closed


@dataclass
class _OpenWindow:
    free: int  # tokens still free
    documents: list[tuple]  # each a tuple of segments
    pair_keys: set  # pairs with a half here (no other half of them may join)


def pack(
    units: Sequence[PackingUnit],
    block_size: int,
    setting: str,
    max_open_windows: int = 64,
    group_sizes: Counter | None = None,
) -> list[list[tuple]]:
    """One setting's windows for ``units`` in the given order (``_BestFit``): each a list of documents.

    Keys are ``(pass, key)`` (``shuffled``); ``group_sizes``: pairs per group in one pass (default: those
    of ``units``, one pass)."""
    documents = SettingDocuments(setting, group_sizes if group_sizes is not None else pair_group_sizes(units))
    packer = _BestFit(block_size, max_open_windows)
    for unit in units:
        for length, segments, pair_keys in documents(unit):
            packer.add(length, segments, pair_keys)
    if documents.waiting:
        raise ValueError("the units end while a pair waits for its mismatched partner")
    return packer.finish()


def _pass_order(n_units: int, seed: int, data_pass: int) -> list[int]:
    order = list(range(n_units))
    random.Random(f"bridge-packing/{seed}/{data_pass}").shuffle(order)
    return order


def shuffled(units: Sequence[PackingUnit], seed: int, data_pass: int) -> list[PackingUnit]:
    """Units in the seeded order of one pass (the same in every setting), keys made ``(pass, key)``."""
    return [units[i]._replace(key=(data_pass, units[i].key)) for i in _pass_order(len(units), seed, data_pass)]


def _stream(units: Sequence[PackingUnit], seed: int) -> Iterator[PackingUnit]:
    """Pass after pass over ``units``, each in its own seeded order (as ``shuffled``), lazily."""
    for data_pass in itertools.count():
        yield from shuffled(units, seed, data_pass)


def split_to(windows: list[list[tuple]], target: int, max_empty_windows: int = 0) -> list[list[tuple]]:
    """Split windows (the one with the most documents first, halving it) until there are ``target``.

    When every window holds a single document and more are needed, up to ``max_empty_windows``
    empty windows (all padding) are appended.
    """
    if len(windows) > target:
        raise ValueError(f"cannot split {len(windows)} windows down to {target}")
    pieces = {(i, 0): list(window) for i, window in enumerate(windows)}
    order = {i: [0] for i in range(len(windows))}
    heap = [(-len(window), i, 0) for i, window in enumerate(windows) if len(window) > 1]
    heapq.heapify(heap)
    empty = 0
    for _ in range(target - len(windows)):
        if not heap:
            if empty < max_empty_windows:
                empty += 1
                continue
            raise ValueError(f"only {len(pieces)} documents: cannot fill {target} windows")
        _, i, serial = heapq.heappop(heap)
        documents = pieces[(i, serial)]
        new_serial = len(order[i])
        half = len(documents) // 2
        pieces[(i, serial)], pieces[(i, new_serial)] = (
            documents[:half],
            documents[half:],
        )
        order[i].insert(order[i].index(serial) + 1, new_serial)
        for s in (serial, new_serial):
            if len(pieces[(i, s)]) > 1:
                heapq.heappush(heap, (-len(pieces[(i, s)]), i, s))
    return [pieces[(i, s)] for i in range(len(windows)) for s in order[i]] + [[] for _ in range(empty)]


@dataclass
class SettingPlan:
    """One setting's planned windows, exactly ``steps x windows_per_step`` of them, how many the packer
    made before ``split_to`` equalized the settings, and (mismatched bridges) each pair's planned partner."""

    windows: list[list[tuple]]
    packer_windows: int
    partners: dict | None = None


@dataclass
class PackingPlan:
    """The settings' windows over the same unit prefix (``plan_packing``).

    ``units_seen``: length of the prefix of the pass-after-pass shuffled stream; ``passes``: passes it
    touches; ``seen``: the ``(pass, key)`` of each of its units; ``requested_steps``: the step budget
    asked for, ``steps`` <= it: the one every setting fills. ``mismatched_bridges`` is None when the
    data cannot have it (``mismatched_unavailable`` says why); the other two are then planned alone."""

    steps: int
    requested_steps: int
    windows_per_step: int
    units_seen: int
    passes: int
    seen: list[tuple]
    bridges: SettingPlan
    no_bridges: SettingPlan
    mismatched_bridges: SettingPlan | None = None
    mismatched_unavailable: str | None = None

    def setting(self, name: str) -> SettingPlan:
        return self.settings[name]

    @property
    def settings(self) -> dict[str, SettingPlan]:
        """The planned settings by name."""
        return {name: getattr(self, name) for name in SETTINGS if getattr(self, name) is not None}


def plan_packing(
    units: Sequence[PackingUnit],
    *,
    block_size: int,
    windows_per_step: int,
    seed: int,
    max_steps: int | None = None,
    num_epochs: float | None = None,
    max_open_windows: int = 64,
    max_empty_windows: int = 0,
) -> PackingPlan:
    """Every setting over the same documents, ``T = steps x windows_per_step`` windows each.

    A step consumes ``windows_per_step`` windows (per-device batch x processes x gradient
    accumulation). Cutting each setting's window stream at the step budget would leave the settings
    with different document sets (bridged documents pack a little less densely). Instead the
    settings' packers run side by side over the shuffled stream (pass after pass, each pass
    reshuffled), recording after every unit how many windows each would need, and the plan takes
    the LONGEST unit prefix that all can pack into ``T`` windows and where no pair waits for its
    mismatched partner (``SettingDocuments``). Each setting's windows are then split (``split_to``)
    until all have exactly ``T``. The settings therefore see exactly the same documents (segments),
    the same number of windows, of real tokens and of steps. Mismatched bridges are planned with the
    other two whenever the data allows them (``mismatched_unavailable``), whichever setting runs, so
    that all three runs of a seed have the same plan.

    A prefix is feasible only when there are at least ``T`` documents to spread over ``T`` windows,
    or ``T - max_empty_windows`` with the rest all-padding windows (the caller keeps
    ``max_empty_windows`` below what one process reads per step, so no process ever has a step
    without a target token); when it is not, the step count is reduced to the largest feasible one
    (``steps`` < ``requested_steps``). With ``num_epochs`` instead of ``max_steps`` the prefix is at
    most ``ceil(num_epochs x units)`` units and ``T`` is rounded up to whole steps. Because ``T`` is a
    whole number of steps of whole batches, a Trainer's sampler shuffling the windows, and its
    sharding of them over processes, consume each planned window exactly once in one epoch.
    """
    if (max_steps is None) == (num_epochs is None):
        raise ValueError("give exactly one of max_steps and num_epochs")
    if not units:
        raise ValueError("no units to pack")
    if windows_per_step < 1:
        raise ValueError(f"windows_per_step must be at least 1, got {windows_per_step}")
    unavailable = mismatched_unavailable(units, block_size)
    names = [name for name in SETTINGS if name != "mismatched_bridges" or unavailable is None]
    group_sizes = pair_group_sizes(units)
    documents = {name: SettingDocuments(name, group_sizes) for name in names}
    counters = {name: _BestFit(block_size, max_open_windows, keep_windows=False) for name in names}
    needed = [0]  # after P units: windows the hungriest setting needs
    bridge_documents = [0]  # after P units: documents with bridges (never more than without)
    whole = [True]  # after P units: no pair waits for its mismatched partner
    limit = math.ceil(num_epochs * len(units)) if num_epochs is not None else None
    budget = max_steps * windows_per_step if max_steps is not None else None
    for unit in _stream(units, seed):
        if limit is not None and len(needed) - 1 >= limit:
            break
        for name, counter in counters.items():
            for length, segments, pair_keys in documents[name](unit):
                counter.add(length, segments, pair_keys)
        bridge_documents.append(bridge_documents[-1] + (1 if unit.is_pair else len(unit.segment_lengths)))
        needed.append(max(counter.window_count for counter in counters.values()))
        whole.append(not any(d.waiting for d in documents.values()))
        if budget is not None and needed[-1] > budget:
            break
    if budget is None:
        budget = math.ceil(needed[-1] / windows_per_step) * windows_per_step
    target = budget
    while True:
        prefix = bisect.bisect_right(needed, target) - 1  # longest prefix all settings fit
        while not whole[prefix]:
            prefix -= 1
        if bridge_documents[prefix] + max_empty_windows >= target:
            break
        target = ((bridge_documents[prefix] + max_empty_windows) // windows_per_step) * windows_per_step
        if target == 0:
            raise ValueError(
                f"the data cannot fill even one step of {windows_per_step} windows in every setting "
                f"({bridge_documents[-1]} documents); lower the batch size or add data"
            )
    seen = list(itertools.islice(_stream(units, seed), prefix))
    settings = {}
    for name in names:
        packed = pack(seen, block_size, name, max_open_windows, group_sizes)
        settings[name] = SettingPlan(split_to(packed, target, max_empty_windows), len(packed))
    if unavailable is None:
        planned = SettingDocuments("mismatched_bridges", group_sizes)
        for unit in seen:
            planned(unit)
        settings["mismatched_bridges"].partners = planned.partners
    return PackingPlan(
        steps=target // windows_per_step,
        requested_steps=budget // windows_per_step,
        windows_per_step=windows_per_step,
        units_seen=prefix,
        passes=seen[-1].key[0] + 1,
        seen=[unit.key for unit in seen],
        mismatched_unavailable=unavailable,
        **settings,
    )


# ---- Collation: planned windows -> model inputs (torch) ---------------------------------


class BridgePackingCollator:
    """Collates planned windows into model inputs with document-isolated attention.

    The collation half of the "custom packing collator that keeps or breaks parallel-pair
    co-location in the context window"; ``plan_packing`` is the planning half.

    **Vocabulary** (of the planning and of the collator).

    - *segment*: token ids ``[start] + tokens`` (``start`` is the EOS id). A monolingual or replay
      text longer than a window was cut, before packing and identically for every setting, into
      segments of at most ``block_size`` tokens. A parallel pair has two segments
      (``study_common.pair_segments``): ``first = [start] + first_side + separator`` and
      ``second = [start] + second_side``.
    - *document*: a run of tokens that attends only to itself; its position ids start at 0.
      With bridges a pair is ONE document, ``first + second``, positions continuing through it,
      so the second half attends to the first. Without bridges each half is its own document. A
      text segment is a document in every setting.
    - *window*: one training row: whole documents, then padding up to ``block_size``. A planned
      window is a list of documents, each a tuple of segments ``((pass, key), part)``.

    **Guarantees** of the packing (for the same units, seed and ``block_size``):

    1. The multiset of segments, hence of tokens, is the same in every setting: the settings
       differ only in how segments are grouped into documents and windows (``SettingDocuments``).
    2. With bridges every pair is one document in one window (100% co-located); without bridges
       the halves of a pair are never in the same window (0% co-located) (``_BestFit``); with
       mismatched bridges neither, but each first half is one document with the second half of its
       planned partner, another pair (``mismatched_partners``), laid out as a bridged pair.
    3. No window holds more than ``block_size`` tokens; no document is ever split across windows
       (documents longer than a window cannot exist: pairs that do not fit one window must be
       removed by the caller, in every setting).
    4. Labels are ``-100`` at the first token of every *segment* (its start token would otherwise
       be predicted across a document boundary, and masking it at the pair's inner boundary too
       keeps the predicted tokens identical in every setting) and on padding; all other labels
       equal the input ids (``window_features``, ``padded_rows``).
    5. Every unit of the packed stream appears exactly once per pass over the data; all settings
       see the same units in the same number of windows and steps (``plan_packing``).

    **Collation** (``__call__``). Each feature is a window from ``window_features``: ``input_ids``,
    ``position_ids`` (restarting at 0 at each document) and ``labels``. The batch pads each window at
    the end to ``block_size`` with ``pad_token_id``, label ``-100`` and position ids restarting at 0
    (the padding is a sequence of its own), and passes NO ``attention_mask``. With
    ``use_cache=False``, transformers (>= 5) then builds a block-diagonal causal mask from the
    position ids (sdpa, eager, flex_attention: B rows of ``block_size``). Flash kernels infer
    boundaries from position ids only for a batch of one row, so for them (``attn_implementation``)
    the B windows go as one flattened row of B x ``block_size`` tokens with ``cu_seq_lens_q/k`` and
    ``max_length_q/k`` (``train_common.packed_batch``): the same tokens, positions and labels in either
    layout, and no token attends across documents. The feature keys are model ``forward`` arguments,
    so Trainer's column removal keeps them.

    **Worked example.** ``block_size=12``, start token ``S``, padding ``P``; a pair whose first side is
    ``e1 e2 e3`` and second side ``t1 t2`` (segments ``S e1 e2 e3`` and ``S t1 t2``), and a text
    ``x1 x2 x3 x4`` (segment ``S x1 x2 x3 x4``). With bridges the pair is one document, and a window
    holding it and the text reads::

        input_ids     S    e1 e2 e3 S    t1 t2 | S    x1 x2 x3 x4
        position_ids  0    1  2  3  4    5  6  | 0    1  2  3  4
        labels        -100 e1 e2 e3 -100 t1 t2 | -100 x1 x2 x3 x4

    ``t1`` attends to ``S e1 e2 e3 S``: the bridge. Without bridges the halves are two documents in two
    windows, and the window with the first half and the text reads::

        input_ids     S    e1 e2 e3 | S    x1 x2 x3 x4 | P    P    P
        position_ids  0    1  2  3  | 0    1  2  3  4  | 0    1    2
        labels        -100 e1 e2 e3 | -100 x1 x2 x3 x4 | -100 -100 -100

    while ``S t1 t2`` (positions ``0 1 2``, labels ``-100 t1 t2``) opens another window. The targets
    (``e1 e2 e3 t1 t2 x1 x2 x3 x4``) are the same in both settings. In the flattened layout the B rows
    follow one another in one row, and ``cu_seq_lens_q`` marks every position 0: ``[0, 7, 12, ...]``
    for the first example.

    Use::

        units = [PackingUnit(0, (5, 7), True), PackingUnit(1, (12,), False)]
        plan = plan_packing(units, block_size=16, windows_per_step=2, seed=0, max_steps=1)
        collator = BridgePackingCollator(block_size=16, pad_token_id=0)
        window = plan.bridges.windows[0]  # documents of ((pass, key), part) segments
        batch = collator([collator.window_features(window, tokens_of_segment)])
    """

    def __init__(self, block_size: int, pad_token_id: int, attn_implementation: str = "sdpa"):
        if block_size < 2:
            raise ValueError(f"block_size must be at least 2, got {block_size}")
        self.block_size = block_size
        self.pad_token_id = pad_token_id
        self.attn_implementation = attn_implementation

    def window_features(self, window: list[tuple], segment_tokens: Callable[[tuple], Sequence[int]]) -> dict:
        """``input_ids``, ``position_ids``, ``labels`` (unpadded) of a planned window."""
        input_ids: list[int] = []
        position_ids: list[int] = []
        labels: list[int] = []
        for document in window:
            position = 0
            for segment in document:
                tokens = [int(t) for t in segment_tokens(segment)]
                input_ids += tokens
                position_ids += range(position, position + len(tokens))
                position += len(tokens)
                labels += [-100] + tokens[1:]
        if len(input_ids) > self.block_size:
            raise ValueError(f"window of {len(input_ids)} tokens exceeds block_size {self.block_size}")
        return {"input_ids": input_ids, "position_ids": position_ids, "labels": labels}

    def padded_rows(self, features: list[dict]) -> dict[str, torch.Tensor]:
        """``input_ids``, ``position_ids``, ``labels`` as B x ``block_size`` tensors, one row per window."""
        batch: dict[str, list[list[int]]] = {
            "input_ids": [],
            "position_ids": [],
            "labels": [],
        }
        for feature in features:
            length = len(feature["input_ids"])
            padding = self.block_size - length
            if padding < 0:
                raise ValueError(f"window of {length} tokens exceeds block_size {self.block_size}")
            batch["input_ids"].append(list(feature["input_ids"]) + [self.pad_token_id] * padding)
            batch["position_ids"].append(list(feature["position_ids"]) + list(range(padding)))
            batch["labels"].append(list(feature["labels"]) + [-100] * padding)
        return {key: torch.tensor(rows, dtype=torch.long) for key, rows in batch.items()}

    def __call__(self, features: list[dict]) -> dict:
        rows = self.padded_rows(features)
        try:
            from train_common import packed_batch
        except ImportError:
            # Copied without train_common.py: only the padded layout, which isolates documents for the
            # kernels that build the mask from position ids.
            if self.attn_implementation not in ("sdpa", "eager"):
                raise ImportError(
                    f"attn_implementation={self.attn_implementation!r} needs train_common.packed_batch (its layout)."
                ) from None
            return rows
        return packed_batch(
            rows["input_ids"],
            rows["position_ids"],
            rows["labels"],
            self.attn_implementation,
        )


# ======================================================================================
# Arguments
# ======================================================================================


@dataclass
class CPTArguments:
    model_name_or_path: str = field(
        default=str(DEFAULT_BASE_MODEL_DIR),
        metadata={
            "help": f"Base model: a local directory or a Hub id (default: {DEFAULT_BASE_MODEL_DIR}, run_pretrain.py's output)."
        },
    )
    lang: str | None = field(
        default=None,
        metadata={
            "help": "Target language of the dataset (ko, zh, bo, mn, ...); default: the `lang` of its "
            "build_stats.json. Given, it must equal that."
        },
    )
    bridges: bool = field(
        default=False,
        metadata={"help": "WITH bridges: each parallel pair is one document (halves co-located)."},
    )
    no_bridges: bool = field(
        default=False,
        metadata={"help": "WITHOUT bridges: pair halves are separate documents, never co-located."},
    )
    mismatched_bridges: bool = field(
        default=False,
        metadata={
            "help": "MISMATCHED bridges (control): each pair's first half is one document with the second half of "
            "another pair (a fixed derangement per seed); no pair's halves are co-located."
        },
    )
    dataset_path: str | None = field(
        default=None,
        metadata={
            "help": "build_pairs.py output (save_to_disk dir); default with --lang and no --dataset_name: "
            "runs/data-<lang>, build_pairs.py's default output."
        },
    )
    dataset_name: str | None = field(
        default=None,
        metadata={"help": "Hub dataset pushed by build_pairs.py --push_to_hub (instead of a path)."},
    )
    dataset_revision: str | None = field(default=None, metadata={"help": "Revision of --dataset_name."})
    dataset_split: str = field(
        default="train",
        metadata={"help": "Split to read when the dataset has several."},
    )
    tokenizer_name: str | None = field(default=None, metadata={"help": "Tokenizer (default: the model's)."})
    block_size: int = field(default=2048, metadata={"help": "Context window in tokens (paper: 2048)."})
    pair_order: str = field(
        default="en_first",
        metadata={
            "help": "Which side of a pair comes first: en_first (default), tgt_first, or random (a coin per pair "
            "seeded by --data_seed/--seed and the pair id; the same in every setting)."
        },
    )
    pair_separator: str = field(
        default="",
        metadata={"help": "Text appended to the first side of every pair, in every setting (default: none)."},
    )
    max_open_windows: int = field(default=64, metadata={"help": "Packer lookahead: windows kept open at once."})
    dump_packing: str | None = field(
        default=None,
        metadata={"help": "Write every planned window as JSON lines to this file (see docs/cpt.md)."},
    )
    attn_implementation: str = field(
        default="sdpa",
        metadata={
            "help": "sdpa (default), eager, flex_attention (GPU) or a flash kernel (GPU: flash_attention_2, ...; "
            "its batches go as one flattened row with sequence boundaries). Isolation is checked before training."
        },
    )
    dtype: str | None = field(default=None, metadata={"help": "Load weights in this dtype (default float32)."})
    preprocessing_num_workers: int | None = field(default=None, metadata={"help": "Processes for tokenization."})

    @property
    def setting(self) -> str:
        """The one setting flag given (``SETTINGS``)."""
        return next(name for name in SETTINGS if getattr(self, name))


def parse_args(argv: list[str] | None = None) -> tuple[CPTArguments, TrainingArguments]:
    parser = HfArgumentParser((CPTArguments, TrainingArguments))
    document_resume_flag(parser)
    if argv is None and len(sys.argv) == 2 and sys.argv[1].endswith(".json"):
        cpt_args, training_args = parser.parse_json_file(json_file=os.path.abspath(sys.argv[1]))
    else:
        cpt_args, training_args = parser.parse_args_into_dataclasses(args=argv)
    if sum(getattr(cpt_args, name) for name in SETTINGS) != 1:
        raise ValueError(
            "Give exactly one of --bridges (pairs co-located in one context window), --no_bridges (pair halves "
            "never in the same window) and --mismatched_bridges (each first half in one window with another "
            "pair's second half); the setting is never implied."
        )
    if cpt_args.dataset_path is not None and cpt_args.dataset_name is not None:
        raise ValueError("Give only one of --dataset_path DIR (build_pairs.py output) and --dataset_name HUB_ID.")
    if cpt_args.dataset_path is None and cpt_args.dataset_name is None:
        if cpt_args.lang is None:
            raise ValueError(
                "No dataset: give --lang LANG to read build_pairs.py's default output runs/data-LANG, "
                "or --dataset_path DIR, or --dataset_name HUB_ID."
            )
        default_data = default_cpt_data_dir(cpt_args.lang)
        if not default_data.is_dir():
            raise FileNotFoundError(
                f"{default_data}: no CPT dataset here (the default --dataset_path for --lang {cpt_args.lang}). "
                f"Run build_pairs.py --lang {cpt_args.lang} first or pass --dataset_path."
            )
        cpt_args.dataset_path = str(default_data)
    if cpt_args.model_name_or_path == str(DEFAULT_BASE_MODEL_DIR) and not DEFAULT_BASE_MODEL_DIR.is_dir():
        raise FileNotFoundError(
            f"{DEFAULT_BASE_MODEL_DIR}: no base model here (the default --model_name_or_path). Run run_pretrain.py "
            "first or pass --model_name_or_path."
        )
    if cpt_args.pair_order not in PAIR_ORDERS:
        raise ValueError(f"--pair_order must be en_first, tgt_first or random, got {cpt_args.pair_order!r}.")
    if cpt_args.block_size < 4:
        raise ValueError(f"--block_size must be at least 4, got {cpt_args.block_size}.")
    if training_args.auto_find_batch_size:
        raise ValueError(
            "--auto_find_batch_size changes the batch size during training, which would break the packing plan "
            "(every setting must consume the same windows per step). Set --per_device_train_batch_size."
        )
    if training_args.use_cache:
        raise ValueError(
            "--use_cache makes training forwards build a KV cache, which turns off the document-isolated attention "
            "that packed windows rely on (documents would attend to each other); remove it."
        )
    if training_args.ignore_data_skip:
        raise ValueError("--ignore_data_skip would re-train windows already seen when resuming; remove it.")
    if training_args.dataloader_num_workers > 0:
        raise ValueError(
            "--dataloader_num_workers > 0 reads windows in worker processes, where the run cannot count that each "
            "planned window is read exactly once; remove it (a window is a slice of memory-mapped Arrow data)."
        )
    check_attention_implementation_trains_on(cpt_args.attn_implementation, training_args.device)
    if training_args.push_to_hub and training_args.hub_strategy == "all_checkpoints":
        # A checkpoint is skipped while the previous upload runs unless this is set; the learning
        # curve needs every one.
        training_args.hub_always_push = True
    return cpt_args, training_args


# ======================================================================================
# Data: tokenized units, token store, packed dataset
# ======================================================================================

REQUIRED_COLUMNS = ("doc_id", "kind", "text", "pair_id", "en", "tgt")
TOKENIZED_FEATURES = datasets.Features(
    {
        "segments": datasets.Sequence(datasets.Sequence(datasets.Value("int32"))),
        "first_side": datasets.Value("string"),
        "drop_reason": datasets.Value("string"),
        "content_digest": datasets.Value("string"),
    }
)


def load_cpt_dataset(cpt_args: CPTArguments) -> tuple[datasets.Dataset, Path | None]:
    """The build_pairs.py dataset and the folder it came from (for its build_stats.json)."""
    if cpt_args.dataset_name:
        from huggingface_hub import snapshot_download

        folder = Path(
            snapshot_download(
                cpt_args.dataset_name,
                repo_type="dataset",
                revision=cpt_args.dataset_revision,
            )
        )
        loaded = datasets.load_dataset(str(folder))
    else:
        folder = Path(cpt_args.dataset_path)
        if not folder.is_dir():
            raise FileNotFoundError(f"{folder}: no such dataset directory. Build it with build_pairs.py.")
        loaded = datasets.load_from_disk(str(folder))
    if isinstance(loaded, datasets.DatasetDict):
        if cpt_args.dataset_split not in loaded:
            raise ValueError(f"{folder}: no split {cpt_args.dataset_split!r} (found {list(loaded)}).")
        loaded = loaded[cpt_args.dataset_split]
    missing = [c for c in REQUIRED_COLUMNS if c not in loaded.column_names]
    if missing:
        raise ValueError(
            f"{folder}: not a build_pairs.py dataset (missing columns {missing}; found {loaded.column_names})."
        )
    return loaded, folder


def dataset_language(lang: str | None, build_stats: dict | None, build_stats_file: Path) -> str:
    """The run's language: the dataset's (build_stats.json ``lang``); a --lang given must equal it."""
    recorded = (build_stats or {}).get("lang")
    if lang is None and recorded is None:
        raise ValueError(
            f"{build_stats_file}: no such file or no 'lang' in it, and no --lang: the run's language is unknown. "
            "Pass --lang, or train on a dataset built by build_pairs.py."
        )
    if lang is not None and recorded is not None and lang != recorded:
        raise ValueError(
            f"--lang {lang} but the dataset is {recorded!r} ({build_stats_file}): the run would be grouped and "
            f"probed as {lang}. Drop --lang (it defaults to the dataset's) or point --dataset_path at the {lang} data."
        )
    return lang if lang is not None else recorded


def tokenize_units(batch, tokenizer, start_id, block_size, pair_order, separator_ids, seed):
    """Segments of every unit (identical for every setting), or the reason it is dropped."""
    n = len(batch["kind"])
    texts, owners = [], []
    for i in range(n):
        kind = batch["kind"][i]
        if kind == "pair":
            texts += [batch["en"][i] or "", batch["tgt"][i] or ""]
            owners += [(i, "en"), (i, "tgt")]
        elif kind in ("mono", "replay"):
            texts.append(batch["text"][i] or "")
            owners.append((i, "text"))
        else:
            raise ValueError(f"document {batch['doc_id'][i]}: unknown kind {kind!r} (expected mono, pair, replay).")
    encoded: dict[tuple[int, str], list[int]] = dict(
        zip(owners, tokenizer(texts, add_special_tokens=False)["input_ids"])
    )
    segments, first_sides, reasons = [], [], []
    # What the record says, not where it sits: resuming recognises the same data by it, and other
    # text of the same shape (same ids, kinds and lengths) by its difference.
    digests = [
        hashlib.blake2b(
            json.dumps(
                [batch["kind"][i], batch["text"][i], batch["en"][i], batch["tgt"][i]],
                ensure_ascii=False,
            ).encode(),
            digest_size=16,
        ).hexdigest()
        for i in range(n)
    ]
    piece = block_size - 1  # every segment is [start] + at most block_size - 1 tokens
    for i in range(n):
        first_side, reason, unit_segments = "", "", []
        if batch["kind"][i] == "pair":
            en, tgt = encoded[(i, "en")], encoded[(i, "tgt")]
            first_side = pair_first_side(batch["pair_id"][i], pair_order, seed)
            first, second = (en, tgt) if first_side == "en" else (tgt, en)
            unit_segments = pair_segments(first, second, start_id, separator_ids)
            if not en or not tgt:
                reason, unit_segments = "empty_after_tokenization", []
            elif len(unit_segments[0]) + len(unit_segments[1]) > block_size:
                reason, unit_segments = "pair_over_block_size", []
        else:
            ids = encoded[(i, "text")]
            if not ids:
                reason = "empty_after_tokenization"
            unit_segments = [[start_id] + ids[at : at + piece] for at in range(0, len(ids), piece)]
        segments.append(unit_segments)
        first_sides.append(first_side)
        reasons.append(reason)
    return {
        "segments": segments,
        "first_side": first_sides,
        "drop_reason": reasons,
        "content_digest": digests,
    }


def tokenize_dataset(raw: datasets.Dataset, tokenizer, cpt_args: CPTArguments, seed: int) -> datasets.Dataset:
    """One row per unit: ``doc_id``, ``kind``, ``pair_id``, ``segments``, ``first_side``, ``drop_reason``,
    ``content_digest`` (of the record's kind and text)."""
    separator_ids = (
        tokenizer(cpt_args.pair_separator, add_special_tokens=False)["input_ids"] if cpt_args.pair_separator else []
    )
    kept = ("doc_id", "kind", "pair_id")
    return raw.map(
        tokenize_units,
        batched=True,
        num_proc=cpt_args.preprocessing_num_workers,
        remove_columns=[c for c in raw.column_names if c not in kept],
        features=datasets.Features({**{c: raw.features[c] for c in kept}, **TOKENIZED_FEATURES}),
        fn_kwargs={
            "tokenizer": tokenizer,
            "start_id": document_start_id(tokenizer),
            "block_size": cpt_args.block_size,
            "pair_order": cpt_args.pair_order,
            "separator_ids": separator_ids,
            "seed": seed,
        },
        desc="Tokenizing units into segments",
    )


def packing_units(tokenized: datasets.Dataset, store: SegmentStore) -> list[PackingUnit]:
    """The units the packer sees: every row not dropped, keyed by its row, with its segment lengths; a
    pair's group is its first side (mismatched partners are then an English and a target half)."""
    rows = zip(tokenized["kind"], tokenized["drop_reason"], tokenized["first_side"], store.segment_lengths())
    return [
        PackingUnit(row, lengths, kind == "pair", first_side or None)
        for row, (kind, reason, first_side, lengths) in enumerate(rows)
        if not reason
    ]


def dropped_units_note(kinds: list[str], reasons: list[str], block_size: int) -> str | None:
    """What tokenization dropped (identically in every setting), why, and what to do; None: nothing.

    Logged as a warning and stated in the model card: a dataset built for a larger window loses here
    every pair that no longer fits, which only the audit's counts would otherwise show."""
    dropped = Counter((kind, reason) for kind, reason in zip(kinds, reasons) if reason)
    if not dropped:
        return None
    records = Counter(kinds)
    why = {"pair_over_block_size": f"longer than --block_size {block_size}", "empty_after_tokenization": "empty"}
    counts = "; ".join(
        f"{n} of {records[kind]} {kind} records ({why.get(reason, reason)}: {reason})"
        for (kind, reason), n in sorted(dropped.items())
    )
    advice = (
        f"To train on them raise --block_size; for data that matches this window, rebuild it at this block size "
        f"(build_pairs.py --block_size {block_size}, which records the drop in build_stats.json)"
        if any(reason == "pair_over_block_size" for _, reason in dropped)
        else "Check the dataset's text and the tokenizer"
    )
    return f"Dropped before packing, in every setting alike: {counts}. {advice}."


class SegmentStore:
    """Token ids of segment ``part`` of dataset row ``row``, read zero-copy from the Arrow files."""

    def __init__(self, tokenized: datasets.Dataset):
        if tokenized._indices is not None:
            tokenized = tokenized.flatten_indices()
        self._chunks = []
        starts = [0]
        for chunk in tokenized.data.table.column("segments").chunks:
            outer = chunk.offsets.to_numpy()
            inner = chunk.values
            self._chunks.append(
                (
                    outer,
                    inner.offsets.to_numpy(),
                    inner.values.to_numpy(zero_copy_only=False),
                )
            )
            starts.append(starts[-1] + len(chunk))
        self._starts = np.array(starts)

    def segment_lengths(self) -> list[tuple[int, ...]]:
        """Token count of every segment, per row."""
        lengths = []
        for outer, inner_offsets, _ in self._chunks:
            sizes = np.diff(inner_offsets)
            lengths += [tuple(sizes[outer[r] : outer[r + 1]].tolist()) for r in range(len(outer) - 1)]
        return lengths

    def tokens(self, row: int, part: int) -> np.ndarray:
        chunk = int(np.searchsorted(self._starts, row, side="right")) - 1
        outer, inner_offsets, values = self._chunks[chunk]
        segment = int(outer[row - self._starts[chunk]]) + part
        return values[inner_offsets[segment] : inner_offsets[segment + 1]]

    def segment_tokens(self, segment: tuple) -> np.ndarray:
        """For ``BridgePackingCollator.window_features``: a segment is ``((pass, row), part)``."""
        (_, row), part = segment
        return self.tokens(row, part)


class PackedWindows(torch.utils.data.Dataset):
    """The planned windows of one setting, materialized lazily as model inputs."""

    def __init__(
        self,
        windows: list[list[tuple]],
        store: SegmentStore,
        collator: BridgePackingCollator,
    ):
        self.windows, self.store, self.collator = windows, store, collator
        self.fetched: Counter = Counter()  # window index -> times read (in this process)

    def __len__(self) -> int:
        return len(self.windows)

    def __getitem__(self, index: int) -> dict:
        self.fetched[index] += 1
        return self.collator.window_features(self.windows[index], self.store.segment_tokens)


class WindowCountCallback(TrainerCallback):
    """Count window reads from the start of the training loop (a length-grouped sampler reads all first)."""

    def __init__(self, dataset: PackedWindows):
        self.dataset = dataset

    def on_train_begin(self, args, state, control, **kwargs):
        self.dataset.fetched.clear()


def check_windows_trained(dataset: PackedWindows, training_args, start_step: int, steps: int, per_step: int) -> dict:
    """Did the Trainer's sampler, over all processes, read each planned window exactly once?

    Measurable because windows are read in the training processes (parse_args refuses dataloader workers)."""
    counts = Counter(dataset.fetched)
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        gathered: list = [None] * torch.distributed.get_world_size()
        torch.distributed.all_gather_object(gathered, dict(counts))
        counts = sum((Counter(c) for c in gathered), Counter())
    expected = (steps - start_step) * per_step
    result = {
        "measured": True,
        "resumed_at_step": start_step,
        "windows_read": sum(counts.values()),
        "distinct_windows_read": len(counts),
        "expected_windows": expected,
        "max_reads_of_one_window": max(counts.values(), default=0),
    }
    result["each_planned_window_once"] = (
        result["windows_read"] == expected == result["distinct_windows_read"] and result["max_reads_of_one_window"] <= 1
    )
    return result


# ======================================================================================
# Audit
# ======================================================================================


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def base_model_identity(model_name_or_path: str) -> dict:
    """The base model by content: SHA-256 of every weights file and of its config.

    The whole content of each file, streamed (about 2 s per GB, once per run): a safetensors
    header holds dtypes, shapes and offsets but no values, so a base retrained with the same
    architecture would have the same header. The config is hashed as sorted JSON without
    ``transformers_version`` (re-saving the same model with another version is the same model).
    """
    folder = Path(model_name_or_path)
    if not folder.is_dir():
        from huggingface_hub import snapshot_download

        folder = Path(snapshot_download(model_name_or_path, allow_patterns=[*WEIGHT_FILES, "config.json"]))
    digests = local_weight_digests(folder)
    if not digests:
        raise FileNotFoundError(f"{folder}: no weights file ({', '.join(WEIGHT_FILES)}) to identify the base model.")
    config = json.loads((folder / "config.json").read_text())
    config.pop("transformers_version", None)
    return {
        "base_model_weights_sha256": weights_sha256(digests),
        "base_model_config_sha256": _sha256(json.dumps(config, sort_keys=True).encode()),
    }


def document_keys(tokenized: datasets.Dataset) -> list[str]:
    """``<doc_id>\t<content digest>`` of every row: a document by its id and by what it says."""
    return [f"{doc_id}\t{digest}" for doc_id, digest in zip(tokenized["doc_id"], tokenized["content_digest"])]


def audit_windows(
    windows,
    store: SegmentStore,
    collator: BridgePackingCollator,
    pair_rows: set,
    doc_keys,
    vocab_size,
    partners: dict | None = None,
    first_sides: list[str] | None = None,
):
    """Measure one setting's planned windows from the features the model will receive.

    ``doc_keys`` (``document_keys``) names each row in ``documents_seen_sha256``, so that hash
    identifies the documents seen by content and count. With ``partners`` (mismatched bridges: pair ->
    pair whose second half it was given) and the rows' ``first_sides``, ``mismatched_pairs`` says
    whether each planned partner shares the pair's document and whether the pairing is a derangement
    of English and target halves."""
    segment_digests: list[bytes] = []
    token_counts = np.zeros(vocab_size, dtype=np.int64)
    target_counts = np.zeros(vocab_size, dtype=np.int64)
    pending_tokens, pending_targets = [], []
    pair_place: dict[tuple, list] = {}  # (pass, row) -> [(window, document, first position) per part]
    seen = Counter()
    real = documents = segments = max_window = 0
    for w, window in enumerate(windows):
        features = collator.window_features(window, store.segment_tokens)
        input_ids = np.asarray(features["input_ids"], dtype=np.int64)
        labels = np.asarray(features["labels"], dtype=np.int64)
        positions = features["position_ids"]
        offset = 0
        for d, document in enumerate(window):
            documents += 1
            for key, part in document:
                tokens = store.segment_tokens((key, part))
                segment_digests.append(hashlib.blake2b(tokens.astype("<i4").tobytes(), digest_size=16).digest())
                segments += 1
                if part == 0:
                    seen[key[1]] += 1
                if key[1] in pair_rows:
                    pair_place.setdefault(key, [None, None])[part] = (
                        w,
                        d,
                        positions[offset],
                    )
                offset += len(tokens)
        real += len(input_ids)
        max_window = max(max_window, len(input_ids))
        pending_tokens.append(input_ids)
        pending_targets.append(labels[labels != -100])
        if len(pending_tokens) >= 1024 or w == len(windows) - 1:
            token_counts += np.bincount(np.concatenate(pending_tokens), minlength=vocab_size)
            target_counts += np.bincount(np.concatenate(pending_targets), minlength=vocab_size)
            pending_tokens, pending_targets = [], []
    co_located = sum(1 for first, second in pair_place.values() if first[0] == second[0])
    attending = sum(1 for first, second in pair_place.values() if first[:2] == second[:2] and second[2] != 0)
    total_pairs = len(pair_place)
    seen_text = "\n".join(f"{doc_keys[row]}\t{count}" for row, count in sorted(seen.items()))
    mismatched = {}
    if partners is not None:
        places = [(pair_place.get(a, [None])[0], pair_place.get(b, [None, None])[1]) for a, b in partners.items()]
        together = sum(1 for first, second in places if first and second and first[0] == second[0])
        mismatched["mismatched_pairs"] = {
            "planned": len(partners),
            "co_located": together,
            "co_located_percent": round(100.0 * together / len(partners), 4) if partners else None,
            "attending_each_other": sum(
                1 for first, second in places if first and second and first[:2] == second[:2] and second[2] != 0
            ),
            "with_own_partner": sum(1 for a, b in partners.items() if a[1] == b[1]),
            "same_language": sum(1 for a, b in partners.items() if first_sides[a[1]] != first_sides[b[1]]),
            "each_half_once": sorted(partners) == sorted(partners.values()) == sorted(pair_place),
        }
    return {
        "windows": len(windows),
        "documents": documents,
        "segments": segments,
        "real_tokens": real,
        "target_tokens": int(target_counts.sum()),
        "real_token_fraction": round(real / (len(windows) * collator.block_size), 6),
        "max_window_tokens": max_window,
        "empty_windows": sum(1 for window in windows if not window),
        "pairs": {
            "total": total_pairs,
            "co_located": co_located,
            "split": total_pairs - co_located,
            "co_located_percent": round(100.0 * co_located / total_pairs, 4) if total_pairs else None,
            "split_percent": round(100.0 * (total_pairs - co_located) / total_pairs, 4) if total_pairs else None,
            "attending_each_other": attending,
        },
        **mismatched,
        "hashes": {
            "segments_multiset_sha256": _sha256(b"".join(sorted(segment_digests))),
            "tokens_multiset_sha256": _sha256(token_counts.tobytes()),
            "targets_multiset_sha256": _sha256(target_counts.tobytes()),
            "documents_seen_sha256": _sha256(seen_text.encode()),
        },
    }


def segment_namer(kinds: list[str], doc_ids: list[str], first_sides: list[str]) -> Callable[[tuple, int], str]:
    """Names of segments in the dump: ``<pass>:<doc_id>/<side>``, side ``en``/``tgt`` or the text piece."""

    def name(key: tuple, part: int) -> str:
        data_pass, row = key
        if kinds[row] == "pair":
            side = first_sides[row] if part == 0 else ("tgt" if first_sides[row] == "en" else "en")
        else:
            side = str(part)
        return f"{data_pass}:{doc_ids[row]}/{side}"

    return name


def write_dump(
    path: Path,
    windows,
    store: SegmentStore,
    collator: BridgePackingCollator,
    segment_names,
) -> None:
    """Every planned window, padded as the model sees it, with a per-token segment id (see docs/cpt.md)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(f".{path.name}.partial-{os.getpid()}")
    with temporary.open("w", encoding="utf-8") as handle:
        for w, window in enumerate(windows):
            batch = collator.padded_rows([collator.window_features(window, store.segment_tokens)])
            doc_ids: list[str | None] = []
            for document in window:
                for key, part in document:
                    doc_ids += [segment_names(key, part)] * len(store.segment_tokens((key, part)))
            doc_ids += [None] * (collator.block_size - len(doc_ids))
            record = {
                "window": w,
                **{k: v[0].tolist() for k, v in batch.items()},
                "doc_ids": doc_ids,
            }
            handle.write(json.dumps(record, ensure_ascii=False) + "\n")
    os.replace(temporary, path)


def isolation_windows(windows, store: SegmentStore, block_size: int) -> tuple[list[list[tuple]], str]:
    """Two windows of the plan to check isolation on, and where they come from.

    The planned windows with the most documents; when none holds two, the first is built from the
    plan's shortest documents, packed as the collator packs any window. Two windows, because the
    batch layout (B rows, or one flattened row for flash kernels) is part of what is checked: in a
    flattened row even two windows of one document each are two documents side by side.
    """
    ranked = sorted((w for w in windows if w), key=len, reverse=True)
    first, origin = ranked[0], "the planned windows with the most documents"
    if len(first) < 2:
        built, used = [], 0
        for length, document in sorted(
            (sum(len(store.segment_tokens(segment)) for segment in document), document)
            for planned in windows
            for document in planned
        ):
            if used + length > block_size:
                break
            built.append(document)
            used += length
        if len(built) >= 2:
            first, origin = (
                built,
                "a window built from the plan's shortest documents, and a planned window",
            )
    second = ranked[1] if len(ranked) > 1 else ranked[0]  # a plan of one window: that window twice
    return [first, second], origin


def check_plan_isolation(
    model,
    windows,
    store: SegmentStore,
    collator: BridgePackingCollator,
    *,
    autocast_dtype=None,
):
    """``train_common.check_document_isolation`` on two windows of the plan (``isolation_windows``),
    batched by the training ``collator``; ``window`` in the result says which."""
    checked, origin = isolation_windows(windows, store, collator.block_size)
    tokens = [[[store.segment_tokens(segment) for segment in document] for document in window] for window in checked]
    return {
        **check_document_isolation(model, collator, tokens, autocast_dtype=autocast_dtype),
        "window": origin,
    }


#: Share of true pairs (both halves of one pair) in one window, per setting.
EXPECTED_CO_LOCATED = {"bridges": 100.0, "no_bridges": 0.0, "mismatched_bridges": 0.0}


def judge_guarantees(
    mine: dict,
    others: dict,
    equal: dict,
    isolation: dict,
    setting: str,
    block_size: int,
):
    """(broken, unchecked): the guarantees this run's plan or model breaks, and those it could not check.

    ``others``: the other planned settings' audits by name. A guarantee that could not be checked is
    never counted as holding: ``guarantees_hold`` in the audit is true only when both lists are empty.
    """
    broken, unchecked = [], []
    if not isolation["holds"]:
        broken.append(
            f"attention crosses documents with attn_implementation={isolation['attn_implementation']} "
            f"({isolation['layout']} layout, {isolation['compute_dtype']} on {isolation['device']}): "
            f"{isolation_failure(isolation) or 'the isolation check did not hold'}; use sdpa or eager"
        )
    for name, audit in {setting: mine, **others}.items():
        where = f"{name} (this run)" if name == setting else name
        pairs, mismatched = audit["pairs"], audit.get("mismatched_pairs")
        if not pairs["total"]:
            unchecked.append(
                f"co-location: no pair is in the planned windows of {where} ({audit['windows']} windows, "
                f"{audit['documents']} documents); raise --max_steps or add pairs to the dataset"
            )
            continue
        if pairs["co_located_percent"] != EXPECTED_CO_LOCATED[name]:
            broken.append(
                f"{pairs['co_located_percent']}% of pairs co-located in {where}, expected {EXPECTED_CO_LOCATED[name]}%"
            )
        if name == "mismatched_bridges" and (
            mismatched is None
            or not mismatched["attending_each_other"] == mismatched["planned"] == pairs["total"]
            or mismatched["with_own_partner"]
            or mismatched["same_language"]
            or not mismatched["each_half_once"]
        ):
            broken.append(f"the planned mismatched partners are not each one document of another pair's "
                          f"English and target halves in {where}: {mismatched}")  # fmt: skip
    if setting == "bridges" and mine["pairs"]["attending_each_other"] != mine["pairs"]["total"]:
        broken.append("some bridged pairs are not one attention document")
    broken += [f"{name} differs between the settings" for name, same in equal.items() if not same]
    if mine["max_window_tokens"] > block_size:
        broken.append("a window exceeds --block_size")
    return broken, unchecked


def enforce_guarantees(audit: dict, plan: PackingPlan, cpt_args: CPTArguments, audit_file: Path | None) -> None:
    """Judge every guarantee of the audit (``judge_guarantees``), record the verdict in it, write it to
    ``audit_file`` (None: not this process) and refuse to train unless every guarantee holds."""
    broken, unchecked = judge_guarantees(
        audit, audit["other_settings"], audit["equal_across_settings"], audit["document_isolation"],
        cpt_args.setting, cpt_args.block_size,
    )  # fmt: skip
    audit["unchecked"] = unchecked
    audit["guarantees_hold"] = not broken and not unchecked  # never true of a guarantee that was not checked
    if audit_file is not None:
        write_json_atomic(audit_file, audit)
    if broken:
        raise RuntimeError(
            "Packing audit failed: " + "; ".join(broken) + f". See {audit_file or 'packing_audit.json'}."
        )
    refuse_unchecked_guarantees(unchecked)
    logger.info(
        "Packing (%s): %d steps x %d windows, %d units seen (%.3f epochs), pairs co-located %s%%, "
        "real tokens %.4f, multisets equal across settings %s: %s", audit["setting"], plan.steps,
        plan.windows_per_step, plan.units_seen, audit["plan"]["data_epochs"], audit["pairs"]["co_located_percent"],
        audit["real_token_fraction"], ", ".join(plan.settings), all(audit["equal_across_settings"].values()),
    )  # fmt: skip
    if plan.mismatched_unavailable:
        logger.warning(
            "Planned without the mismatched-bridges control (it cannot run on this data: %s): a "
            "--mismatched_bridges run would be refused.", plan.mismatched_unavailable,
        )  # fmt: skip
    if plan.steps < plan.requested_steps:
        logger.warning(
            "Trained steps trimmed from %d to %d so that the settings see the same documents.",
            plan.requested_steps,
            plan.steps,
        )


def refuse_unchecked_guarantees(unchecked: list[str]) -> None:
    """Refuse to train on a guarantee that could not be checked."""
    if unchecked:
        raise ValueError(
            "Refusing to train: a guarantee of the setting could not be checked: " + "; ".join(unchecked) + ". "
            "Nothing was trained."
        )


# ======================================================================================
# The setting, recorded in trainer_state.json
# ======================================================================================


class CPTSettingCallback(TrainerCallback, ExportableState):
    """Stores the CPT setting in trainer_state.json (``stateful_callbacks``)."""

    def __init__(self, cpt_setting: dict | None = None):
        self.cpt_setting = cpt_setting or {}

    def state(self) -> dict:
        return {"args": {"cpt_setting": self.cpt_setting}, "attributes": {}}


#: cpt_setting keys that say where things are, not what they are: the same data or base model
#: moved elsewhere is recognised by its content hashes.
LOCATION_KEYS = ("dataset", "base_model")
#: How a difference in a content hash is named when a checkpoint is refused.
CONTENT_KEYS = {
    "base_model_weights_sha256": "base model weights differ",
    "base_model_config_sha256": "base model config differs",
    "dataset_sha256": "dataset content differs",
    "documents_seen_sha256": "documents seen differ",
}


def check_resume_setting(checkpoint: str, cpt_setting: dict) -> None:
    """Refuse to resume a checkpoint made in another setting, from another base model, on other data
    or with another packing plan, naming each difference.

    Every key of ``cpt_setting`` must match except ``LOCATION_KEYS``. The base model is identified by
    the content of its weights and config (``base_model_identity``), the data by the content of
    every record (``dataset_sha256``) and of the documents seen (``documents_seen_sha256``).
    """
    config_file = Path(checkpoint) / "config.json"
    if not config_file.is_file():
        raise FileNotFoundError(f"{checkpoint}: no config.json; is it a checkpoint of run_cpt.py?")
    stored = json.loads(config_file.read_text()).get("cpt_setting") or {}
    differ = sorted(
        k for k in set(stored) | set(cpt_setting) if k not in LOCATION_KEYS and stored.get(k) != cpt_setting.get(k)
    )
    if differ:

        def described(key: str) -> str:
            old, new = stored.get(key), cpt_setting.get(key)
            if key in CONTENT_KEYS and isinstance(old, str) and isinstance(new, str):
                return f"{CONTENT_KEYS[key]} (sha256 {old[:12]}.. in the checkpoint vs {new[:12]}.. now)"
            return f"{key} differs ({old!r} in the checkpoint vs {new!r} now)"

        raise ValueError(
            f"{checkpoint} does not match this run: {'; '.join(described(k) for k in differ)} (differs in {differ}). "
            "It was trained with another setting, base model, data or packing plan: resume with the same base "
            "model, data, arguments and world size, or use a new --output_dir."
        )


# ======================================================================================
# The run: base model, refusals, audit, model card
# ======================================================================================


def load_base_model(cpt_args: CPTArguments):
    """(model, tokenizer) of the base, with the flash guard on the model and no KV cache."""
    tokenizer = AutoTokenizer.from_pretrained(cpt_args.tokenizer_name or cpt_args.model_name_or_path)
    try:
        model = AutoModelForCausalLM.from_pretrained(
            cpt_args.model_name_or_path,
            dtype=cpt_args.dtype,
            attn_implementation=cpt_args.attn_implementation,
        )
    except ImportError as err:  # e.g. flash_attention_2 without the flash-attn package
        raise ValueError(f"--attn_implementation {cpt_args.attn_implementation}: {err}") from err
    guard_flash_attention_inputs(model)  # no batch of several rows without sequence boundaries reaches flash
    # Document isolation comes from restarting position ids with NO attention mask; a KV cache
    # would silently turn it off.
    model.config.use_cache = False
    max_positions = getattr(model.config, "max_position_embeddings", None)
    if max_positions is not None and cpt_args.block_size > max_positions:
        raise ValueError(f"--block_size {cpt_args.block_size} exceeds the model's {max_positions} positions.")
    return model, tokenizer


def refuse_data_without_pairs(units, kinds, reasons, build_stats: dict | None, dataset_folder: Path) -> None:
    """Without pairs the two settings train on identical windows: their difference would measure nothing."""
    if not units:
        raise ValueError(f"{dataset_folder}: no unit left after tokenization; see the dataset's build_stats.json.")
    if any(unit.is_pair for unit in units):
        return
    pair_records = sum(1 for kind in kinds if kind == "pair")
    dropped_here = Counter(reason for kind, reason in zip(kinds, reasons) if kind == "pair" and reason)
    counts = (
        f"build_stats.json: pair read {build_stats['read']['pair']}, kept {build_stats['kept']['pair']}, "
        f"dropped { {r: n for r, n in build_stats['dropped']['pair'].items() if n} }"
        if build_stats
        else "no build_stats.json"
    )
    raise ValueError(
        f"{dataset_folder}: no parallel pair to train on ({pair_records} pair records"
        + (f", all dropped here: {dict(dropped_here)}" if dropped_here else "")
        + f"; {counts}). With no pairs the settings train on the same windows and their comparison measures "
        "nothing; rebuild the dataset with build_pairs.py from parallel pairs."
    )


def build_audit(
    plan: PackingPlan,
    store,
    collator,
    tokenized,
    units,
    build_stats,
    cpt_args,
    training_args,
    seed: int,
    vocab_size,
) -> dict:
    """packing_audit.json before training: every planned setting's windows measured from the features
    the model will receive (``audit_windows``), compared with this run's, and the run's ``cpt_setting``
    (what a checkpoint must match to be resumed)."""
    setting = cpt_args.setting
    kinds, reasons = tokenized["kind"], tokenized["drop_reason"]
    doc_keys = document_keys(tokenized)
    pair_rows = {unit.key for unit in units if unit.is_pair}
    audits = {
        name: audit_windows(planned.windows, store, collator, pair_rows, doc_keys, vocab_size, planned.partners,
                            tokenized["first_side"])
        for name, planned in plan.settings.items()
    }  # fmt: skip
    mine = audits.pop(setting)
    equal = {
        name.removesuffix("_sha256"): all(other["hashes"][name] == mine["hashes"][name] for other in audits.values())
        for name in ("segments_multiset_sha256", "tokens_multiset_sha256", "targets_multiset_sha256",
                     "documents_seen_sha256")
    }  # fmt: skip
    for name in ("windows", "real_tokens"):
        equal[name] = all(other[name] == mine[name] for other in audits.values())
    windows_per_step = plan.windows_per_step
    cpt_setting = {
        "lang": cpt_args.lang,
        "setting": setting,
        "bridges": setting == "bridges",
        "block_size": cpt_args.block_size,
        "pair_order": cpt_args.pair_order,
        "pair_separator": cpt_args.pair_separator,
        "seed": seed,
        "dataset": cpt_args.dataset_name or str(Path(cpt_args.dataset_path).resolve()),
        "dataset_sha256": _sha256("\n".join(doc_keys).encode()),
        "base_model": cpt_args.model_name_or_path,
        **base_model_identity(cpt_args.model_name_or_path),
        "steps": plan.steps,
        "windows_per_step": windows_per_step,
        "documents_seen_sha256": mine["hashes"]["documents_seen_sha256"],
    }
    kind_of_row = dict(enumerate(kinds))
    dropped = Counter(f"{kind}:{reason}" for kind, reason in zip(kinds, reasons) if reason)
    planned = plan.setting(setting)
    return {
        "setting": setting,
        "cpt_setting": cpt_setting,
        "world_size": training_args.world_size,
        "per_device_train_batch_size": training_args.per_device_train_batch_size,
        "gradient_accumulation_steps": training_args.gradient_accumulation_steps,
        "windows_per_step": windows_per_step,
        "dataset": {
            "units": len(kinds),
            "units_by_kind": dict(Counter(kinds)),
            "units_dropped": {
                "count": sum(dropped.values()),
                "by_reason": dict(sorted(dropped.items())),
                "note": dropped_units_note(kinds, reasons, cpt_args.block_size),
            },
            "units_packed": len(units),
            "text_units_cut_into_segments": sum(1 for u in units if not u.is_pair and len(u.segment_lengths) > 1),
            "build_stats_dropped": build_stats.get("dropped") if build_stats else None,
        },
        "plan": {
            "requested_steps": plan.requested_steps,
            "steps": plan.steps,
            "steps_trimmed": plan.requested_steps - plan.steps,
            "windows": len(planned.windows),
            "units_seen": plan.units_seen,
            "data_passes_touched": plan.passes,
            "data_epochs": round(plan.units_seen / len(units), 6),
            "documents_seen_by_kind": dict(Counter(kind_of_row[key[1]] for key in plan.seen)),
            "packer_windows": planned.packer_windows,
            "packer_real_token_fraction": round(
                mine["real_tokens"] / (planned.packer_windows * cpt_args.block_size), 6
            ),
            "windows_split_to_equalize": len(planned.windows) - planned.packer_windows,
            "max_open_windows": cpt_args.max_open_windows,
            "settings": list(plan.settings),
            "mismatched_bridges_unavailable": plan.mismatched_unavailable,
        },
        **mine,
        "other_settings": {
            name: {**other, "packer_windows": plan.setting(name).packer_windows} for name, other in audits.items()
        },
        "equal_across_settings": equal,
    }


class CPTTrainer(ModelCardMixin, Trainer):
    """A Trainer whose model card (also the one pushed to the Hub) records the CPT setting."""


#: How each setting lays a parallel pair out, in the model card.
SETTING_DESCRIPTIONS = {
    "bridges": "WITH bridges (each parallel pair in one context window)",
    "no_bridges": "WITHOUT bridges (pair halves never share a context window)",
    "mismatched_bridges": "with MISMATCHED bridges (each pair's first half in one document with another pair's "
    "second half; no pair's halves share a context window)",
}


def model_card(audit: dict, cpt_args: CPTArguments, training_args) -> ModelCard:
    """The model card: the run's cpt_setting and packing, and the steps trained when it is written."""
    setting = audit["cpt_setting"]
    rows = {
        **setting,
        "run name": training_args.run_name,
        "tokens per step": audit["windows_per_step"] * cpt_args.block_size,
        "pairs co-located": f"{audit['pairs']['co_located_percent']}%",
        **({"planned mismatched partners co-located": f"{audit['mismatched_pairs']['co_located_percent']}%"}
           if "mismatched_pairs" in audit else {}),
        "real-token fraction": audit["real_token_fraction"],
        "units dropped before packing": audit["dataset"]["units_dropped"]["note"] or "none",
        "world size": training_args.world_size,
    }  # fmt: skip
    return ModelCard(
        title=f"CPT {setting['lang']}, {audit['setting']}, seed {setting['seed']}",
        summary=f"Continual pretraining of {cpt_args.model_name_or_path} on {setting['lang']} "
        f"{SETTING_DESCRIPTIONS[audit['setting']]}. packing_audit.json proves the setting.",
        setting=rows,
        tags=["cross-lingual-transfer", "cpt", audit["setting"]],
        progress=lambda steps: {"steps trained": steps},
    )


# ======================================================================================
# Main
# ======================================================================================


def main(argv: list[str] | None = None) -> dict:
    """Continue the base model in one setting; returns the packing audit (also OUT/packing_audit.json)."""
    # 1. Arguments, and the refusals that need no data: nothing is read or written before them.
    use_cpu_backend_without_gpu()  # before TrainingArguments: a CPU multi-process launch joins gloo
    cpt_args, training_args = parse_args(argv)
    setup_logging(training_args)

    # 2. The dataset and its language, which name the run and its folder; the checkpoint it resumes from.
    raw, dataset_folder = load_cpt_dataset(cpt_args)
    build_stats_file = dataset_folder / "build_stats.json"
    build_stats = json.loads(build_stats_file.read_text()) if build_stats_file.is_file() else None
    cpt_args.lang = dataset_language(cpt_args.lang, build_stats, build_stats_file)
    run_name = default_cpt_run_name(cpt_args.lang, cpt_args.setting, training_args.seed)
    if training_args.run_name is None:
        training_args.run_name = run_name
    if not output_dir_given(argv):  # not transformers' trainer_output/, where the settings would collide
        training_args.output_dir = str(RUNS_DIR / run_name)
    output_dir = Path(training_args.output_dir)
    checkpoint = resume_checkpoint(training_args.resume_from_checkpoint, output_dir)  # never one silently
    seed = training_args.data_seed if training_args.data_seed is not None else training_args.seed

    # 3. The base model and its tokenizer.
    model, tokenizer = load_base_model(cpt_args)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else document_start_id(tokenizer)
    collator = BridgePackingCollator(cpt_args.block_size, pad_id, cpt_args.attn_implementation)

    # 4. Data: every unit tokenized into segments, identically for every setting.
    with training_args.main_process_first(desc="tokenizing the CPT dataset"):
        tokenized = tokenize_dataset(raw, tokenizer, cpt_args, seed)
    store = SegmentStore(tokenized)
    units = packing_units(tokenized, store)
    dropped = dropped_units_note(tokenized["kind"], tokenized["drop_reason"], cpt_args.block_size)
    if dropped:
        logger.warning(dropped)
    refuse_data_without_pairs(units, tokenized["kind"], tokenized["drop_reason"], build_stats, dataset_folder)
    if cpt_args.mismatched_bridges and (why := mismatched_unavailable(units, cpt_args.block_size)):
        raise InputError(
            f"--mismatched_bridges cannot run on {dataset_folder}: {why}. It needs two pairs of each pair order "
            f"and every first half to fit one window with any second half: add pairs, rebuild the data with "
            f"pairs of at most half the window (build_pairs.py --block_size {cpt_args.block_size // 2}), or "
            "raise --block_size."
        )

    # 5. The plan: every setting over the same documents, audited; a checkpoint must be of this very plan.
    windows_per_device_step = training_args.per_device_train_batch_size * training_args.gradient_accumulation_steps
    plan = plan_packing(
        units,
        block_size=cpt_args.block_size,
        windows_per_step=windows_per_device_step * training_args.world_size,
        seed=seed,
        max_steps=training_args.max_steps if training_args.max_steps > 0 else None,
        num_epochs=None if training_args.max_steps > 0 else training_args.num_train_epochs,
        max_open_windows=cpt_args.max_open_windows,
        # An all-padding window is allowed only where the data has fewer documents than windows,
        # and never as many as one process reads per step (a step without targets would be NaN).
        max_empty_windows=windows_per_device_step - 1,
    )
    windows = plan.setting(cpt_args.setting).windows
    vocab_size = max(len(tokenizer), model.config.vocab_size)
    audit = build_audit(plan, store, collator, tokenized, units, build_stats, cpt_args, training_args, seed, vocab_size)
    if checkpoint:
        check_resume_setting(checkpoint, audit["cpt_setting"])

    # 6. Document isolation, checked where and how the run trains: the training device (the model goes
    # there now rather than in the Trainer; under FSDP the unsharded model, before wrapping), the run's
    # kernel, precision and batch layout. Then every guarantee judged; training only if all hold.
    model.to(training_args.device)
    audit["document_isolation"] = check_plan_isolation(
        model, windows, store, collator, autocast_dtype=autocast_dtype(training_args)
    )
    enforce_guarantees(audit, plan, cpt_args, output_dir / "packing_audit.json" if training_args.should_save else None)

    # 7. Every planned window, for an independent check (--dump_packing).
    if cpt_args.dump_packing and training_args.should_save:
        names = segment_namer(tokenized["kind"], tokenized["doc_id"], tokenized["first_side"])
        write_dump(Path(cpt_args.dump_packing), windows, store, collator, names)
        logger.info("Wrote %d packed windows to %s", len(windows), cpt_args.dump_packing)

    # 8. Train: one pass over the planned windows, each read exactly once (counted); then the model,
    # the metrics and the card (pushed with the model).
    model.config.cpt_setting = audit["cpt_setting"]
    training_args.max_steps = plan.steps
    set_seed(training_args.seed)
    train_dataset = PackedWindows(windows, store, collator)
    trainer = CPTTrainer(
        model=model,
        args=training_args,
        train_dataset=train_dataset,
        data_collator=collator,
        processing_class=tokenizer,
        callbacks=[CPTSettingCallback(audit["cpt_setting"]), WindowCountCallback(train_dataset)],
    )
    trainer.model_card = model_card(audit, cpt_args, training_args)
    trainer.create_model_card()
    start_step = json.loads((Path(checkpoint) / "trainer_state.json").read_text())["global_step"] if checkpoint else 0
    result = trainer.train(resume_from_checkpoint=checkpoint)
    audit["windows_trained"] = check_windows_trained(
        train_dataset, training_args, start_step, plan.steps, plan.windows_per_step
    )
    if training_args.should_save:
        write_json_atomic(output_dir / "packing_audit.json", audit)
    if audit["windows_trained"].get("each_planned_window_once") is False:
        raise RuntimeError(f"The Trainer did not read each planned window exactly once: {audit['windows_trained']}")
    trainer.save_model()
    metrics = {**result.metrics, "train_windows": len(windows), "train_real_tokens": audit["real_tokens"]}
    finish_training(trainer, metrics, commit_message=f"End of training: {training_args.run_name}")
    return audit


if __name__ == "__main__":
    exit_on_input_error(main)
