"""Bridge-aware packing: parallel pairs kept in one context window (bridges), or never (no bridges).

Needs only the standard library, numpy and torch. A *unit* is a parallel pair (two segments) or a text (one or
more segments); a *segment* is ``[start] + tokens``; a *document* is a run of segments that attends only to itself.
With ``bridges`` a pair is one document, its second half attending to its first; with ``no_bridges`` its halves are
two documents that never share a window; with ``mismatched_bridges`` (the control) a pair's first half is one
document with another pair's second half. ``plan_packing`` packs every setting over the same prefix of a seeded
stream into exactly ``steps x windows_per_step`` windows; ``BridgePackingCollator`` turns a window into model inputs
(position ids restart at every document, labels -100 at segment starts and padding, no attention mask: transformers
builds the per-document causal mask from the position ids); ``audit_windows`` and ``plan_guarantees`` measure and
judge a plan (docs/cpt.md).

Example: a pair whose halves are the segments ``S e1 e2 e3`` and ``S t1 t2`` and a text ``S x1 x2 x3 x4``
(start token ``S`` = 1, padding ``P`` = 0, ``e1`` = 11, ...). With bridges one window of 12 holds both::

    >>> units = [PackingUnit("pair", (4, 3), is_pair=True), PackingUnit("text", (5,), is_pair=False)]
    >>> stream = shuffled(units, seed=0, data_pass=0)
    >>> tokens = {("pair", 0): [1, 11, 12, 13], ("pair", 1): [1, 21, 22], ("text", 0): [1, 31, 32, 33, 34]}
    >>> collator = BridgePackingCollator(block_size=12, pad_token_id=0)
    >>> def show(windows):
    ...     batch = collator([collator.window_features(w, lambda s: tokens[s.key, s.part]) for w in windows])
    ...     for name in ("input_ids", "position_ids", "labels"):
    ...         print(name, batch[name].tolist())
    >>> show(pack(stream, block_size=12, setting="bridges"))
    input_ids [[1, 11, 12, 13, 1, 21, 22, 1, 31, 32, 33, 34]]
    position_ids [[0, 1, 2, 3, 4, 5, 6, 0, 1, 2, 3, 4]]
    labels [[-100, 11, 12, 13, -100, 21, 22, -100, 31, 32, 33, 34]]

``t1`` (21) attends to ``S e1 e2 e3 S``: the bridge. Without bridges the halves go to two windows::

    >>> show(pack(stream, block_size=12, setting="no_bridges"))
    input_ids [[1, 11, 12, 13, 1, 31, 32, 33, 34, 0, 0, 0], [1, 21, 22, 0, 0, 0, 0, 0, 0, 0, 0, 0]]
    position_ids [[0, 1, 2, 3, 0, 1, 2, 3, 4, 0, 1, 2], [0, 1, 2, 0, 1, 2, 3, 4, 5, 6, 7, 8]]
    labels [[-100, 11, 12, 13, -100, 31, 32, 33, 34, -100, -100, -100], [-100, 21, 22, -100, -100, -100, -100, -100, -100, -100, -100, -100]]

The targets (labels other than -100) are the same tokens in both settings. ``plan_packing`` then splits the
bridged window in two, so that both settings train on the same number of windows::

    >>> plan = plan_packing(units, block_size=12, windows_per_step=2, seed=0, num_epochs=1)
    >>> [[[f"{s.key}.{s.part}" for s in doc] for doc in window] for window in plan.settings["bridges"].windows]
    [[['pair.0', 'pair.1']], [['text.0']]]
"""

from __future__ import annotations

import bisect
import hashlib
import heapq
import itertools
import math
import random
from collections import Counter
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import NamedTuple

import numpy as np
import torch

#: The settings, as run_cpt.py's ``cpt_setting["setting"]`` records them.
SETTINGS = ("bridges", "no_bridges", "mismatched_bridges")


class PackingUnit(NamedTuple):
    """One record of the data: ``key`` unique within a pass, the tokens of each segment, whether it is a pair
    (two segments), and the ``group`` within which pairs get mismatched partners (run_cpt.py: the first side)."""

    key: object
    segment_lengths: tuple[int, ...]
    is_pair: bool
    group: object = None


class Segment(NamedTuple):
    """Segment ``part`` of unit ``key`` in pass ``data_pass``; a window is a list of documents of segments."""

    data_pass: int
    key: object
    part: int

    @property
    def unit(self) -> tuple:
        """``(data_pass, key)``: the unit in the stream, as ``PackingPlan.seen`` and ``partners`` name it."""
        return self.data_pass, self.key


class Document(NamedTuple):
    """A document to place: its tokens, segments, and the pairs with a half in it (whose other halves it avoids)."""

    length: int
    segments: tuple[Segment, ...]
    pair_keys: tuple = ()


def mismatched_partners(cycle: list[PackingUnit]) -> list[PackingUnit]:
    """The derangement of mismatched bridges: each pair of a cycle (2 or 3 distinct pairs) gets the second
    half of the next pair, cyclically, so no pair is its own partner."""
    return cycle[1:] + cycle[:1]


class SettingDocuments:
    """The documents of one setting, unit after unit of the stream. With mismatched bridges, pairs wait per pass
    and ``group`` until two have come (three at the end of an odd pass: ``group_sizes``)."""

    def __init__(self, setting: str, group_sizes: Counter):
        if setting not in SETTINGS:
            raise ValueError(f"setting must be one of {', '.join(SETTINGS)}, got {setting!r}")
        self.setting, self.group_sizes = setting, group_sizes
        self._waiting: dict[object, list[PackingUnit]] = {}
        self._come: Counter = Counter()  # (pass, group) -> pairs come

    @property
    def waiting(self) -> bool:
        return any(self._waiting.values())

    def __call__(self, unit: PackingUnit) -> list[Document]:
        """The documents ``unit`` (of the stream: its key is ``(pass, key)``) completes: none while a pair waits."""
        lengths = unit.segment_lengths
        if not unit.is_pair:
            return [Document(length, (Segment(*unit.key, part),)) for part, length in enumerate(lengths)]
        if len(lengths) != 2:
            raise ValueError(f"pair {unit.key!r} has {len(lengths)} segments, expected 2")
        if self.setting == "bridges":
            return [Document(lengths[0] + lengths[1], (Segment(*unit.key, 0), Segment(*unit.key, 1)))]
        if self.setting == "no_bridges":
            return [Document(lengths[part], (Segment(*unit.key, part),), (unit.key,)) for part in (0, 1)]
        waiting = self._waiting.setdefault(unit.group, [])
        waiting.append(unit)
        self._come[unit.key[0], unit.group] += 1
        left = self.group_sizes[unit.group] - self._come[unit.key[0], unit.group]
        if len(waiting) < 2 or (len(waiting) == 2 and left == 1):
            return []
        self._waiting[unit.group] = []
        documents = []
        for pair, partner in zip(waiting, mismatched_partners(waiting)):
            length = pair.segment_lengths[0] + partner.segment_lengths[1]
            documents.append(
                Document(length, (Segment(*pair.key, 0), Segment(*partner.key, 1)), (pair.key, partner.key))
            )
        return documents


def pair_group_sizes(units: Iterable[PackingUnit]) -> Counter:
    """Pairs per ``group`` in ``units`` (one pass)."""
    return Counter(unit.group for unit in units if unit.is_pair)


def mismatched_unavailable(units: Sequence[PackingUnit], block_size: int) -> str | None:
    """Why ``units`` cannot have mismatched bridges (None: they can): a group of one pair, or halves too long."""
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
    """Online best fit over at most ``max_open`` open windows: a document goes into the fitting window with the
    least free space (ties: the earliest) that holds no other half of its pairs, else into a new one (the fullest
    closed first when ``max_open`` are open)."""

    def __init__(self, block_size: int, max_open: int):
        self.block_size, self.max_open = block_size, max_open
        self.closed: list[list[tuple[Segment, ...]]] = []
        self._open: list[tuple] = []  # (free tokens, serial, documents, pairs with a half there): best fit first
        self._serials = itertools.count()  # the order windows were opened in

    @property
    def window_count(self) -> int:
        """Windows needed if the stream ended now (closed + open)."""
        return len(self.closed) + len(self._open)

    def add(self, document: Document) -> None:
        if document.length > self.block_size:
            raise ValueError(f"a document of {document.length} tokens cannot fit a window of {self.block_size}")
        position = bisect.bisect_left(self._open, (document.length, -1))
        while position < len(self._open) and not self._open[position][3].isdisjoint(document.pair_keys):
            position += 1
        if position < len(self._open):
            free, serial, documents, pair_keys = self._open.pop(position)
        else:
            if len(self._open) >= self.max_open:
                self.closed.append(self._open.pop(0)[2])  # the fullest window
            free, serial, documents, pair_keys = self.block_size, next(self._serials), [], set()
        documents.append(document.segments)
        pair_keys.update(document.pair_keys)
        if free == document.length:
            self.closed.append(documents)
        else:
            bisect.insort(self._open, (free - document.length, serial, documents, pair_keys))

    def finish(self) -> list[list[tuple[Segment, ...]]]:
        return self.closed + [window[2] for window in sorted(self._open, key=lambda window: window[1])]


def pack(
    units: Sequence[PackingUnit],
    block_size: int,
    setting: str,
    max_open_windows: int = 64,
    group_sizes: Counter | None = None,
) -> list[list[tuple[Segment, ...]]]:
    """One setting's windows for the stream ``units`` (keys ``(pass, key)``: ``shuffled``), in order."""
    documents = SettingDocuments(setting, group_sizes if group_sizes is not None else pair_group_sizes(units))
    packer = _BestFit(block_size, max_open_windows)
    for unit in units:
        for document in documents(unit):
            packer.add(document)
    if documents.waiting:
        raise ValueError("the units end while a pair waits for its mismatched partner")
    return packer.finish()


def shuffled(units: Sequence[PackingUnit], seed: int, data_pass: int) -> list[PackingUnit]:
    """Units in the seeded order of one pass (the same in every setting), keys made ``(pass, key)``."""
    order = list(range(len(units)))
    random.Random(f"bridge-packing/{seed}/{data_pass}").shuffle(order)
    return [units[i]._replace(key=(data_pass, units[i].key)) for i in order]


def _stream(units: Sequence[PackingUnit], seed: int) -> Iterator[PackingUnit]:
    """Pass after pass over ``units``, each in its own seeded order, lazily."""
    for data_pass in itertools.count():
        yield from shuffled(units, seed, data_pass)


def split_to(windows: list[list[tuple]], target: int, max_empty_windows: int = 0) -> list[list[tuple]]:
    """Halve the window with the most documents (ties: the earliest) until there are ``target``; when every window
    holds one document, up to ``max_empty_windows`` empty (all-padding) windows are appended."""
    if len(windows) > target:
        raise ValueError(f"cannot split {len(windows)} windows down to {target}")
    pieces = {i: (i, 0, list(window)) for i, window in enumerate(windows)}  # serial: window, first document, documents
    heap = [(-len(window), i, i) for i, window in enumerate(windows) if len(window) > 1]
    heapq.heapify(heap)
    while heap and len(pieces) < target:
        _, i, serial = heapq.heappop(heap)
        _, first, documents = pieces[serial]
        half, new = len(documents) // 2, len(pieces)
        pieces[serial], pieces[new] = (i, first, documents[:half]), (i, first + half, documents[half:])
        for s in (serial, new):
            if len(pieces[s][2]) > 1:
                heapq.heappush(heap, (-len(pieces[s][2]), i, s))
    empty = target - len(pieces)
    if empty > max_empty_windows:
        raise ValueError(f"only {len(pieces)} documents: cannot fill {target} windows")
    return [piece[2] for piece in sorted(pieces.values(), key=lambda piece: piece[:2])] + [[] for _ in range(empty)]


@dataclass
class SettingPlan:
    """One setting's windows, how many the packer made before ``split_to``, and (mismatched bridges) each pair's
    partner: ``(pass, key)`` of the pair whose second half its first half is one document with."""

    windows: list[list[tuple[Segment, ...]]]
    packer_windows: int
    partners: dict | None = None


@dataclass
class PackingPlan:
    """``settings`` (by name, in ``SETTINGS`` order) packed over the same prefix of the stream, ``seen`` (its unit
    keys ``(pass, key)``); no ``mismatched_bridges`` when the data cannot have it (``mismatched_unavailable``)."""

    steps: int
    requested_steps: int
    windows_per_step: int
    seen: list[tuple]
    settings: dict[str, SettingPlan]
    mismatched_unavailable: str | None = None


def _prefix_needs(stream, names, group_sizes, block_size, max_open_windows, budget) -> list[tuple[int, int, bool]]:
    """After each prefix of ``stream`` (none, one unit, ...): (windows the hungriest setting needs, documents with
    bridges, no pair waits), every setting's packer counting side by side until one needs more than ``budget``."""
    documents = {name: SettingDocuments(name, group_sizes) for name in names}
    counters = {name: _BestFit(block_size, max_open_windows) for name in names}
    needs = [(0, 0, True)]
    for unit in stream:
        for name, counter in counters.items():
            for document in documents[name](unit):
                counter.add(document)
        bridged = needs[-1][1] + (1 if unit.is_pair else len(unit.segment_lengths))
        windows = max(counter.window_count for counter in counters.values())
        needs.append((windows, bridged, not any(d.waiting for d in documents.values())))
        if budget is not None and windows > budget:
            break
    return needs


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

    Cutting each setting at the step budget would leave them different documents (bridged documents pack less
    densely); instead the plan takes the longest prefix of the stream that every setting packs into ``T``
    windows, then splits each setting's windows (``split_to``) to exactly ``T``; too few documents lower the
    steps. With ``num_epochs`` the prefix is at most ``ceil(num_epochs x units)``. Mismatched bridges are planned
    whenever the data allows, so the three runs of a seed share one plan. ``T`` is a whole number of global
    batches: one Trainer epoch reads each window exactly once."""
    if (max_steps is None) == (num_epochs is None):
        raise ValueError("give exactly one of max_steps and num_epochs")
    if not units or windows_per_step < 1:
        raise ValueError(f"nothing to pack: {len(units)} units, {windows_per_step} windows per step")
    unavailable = mismatched_unavailable(units, block_size)
    names = [name for name in SETTINGS if name != "mismatched_bridges" or unavailable is None]
    group_sizes = pair_group_sizes(units)
    limit = math.ceil(num_epochs * len(units)) if num_epochs is not None else None
    budget = max_steps * windows_per_step if max_steps is not None else None
    stream = itertools.islice(_stream(units, seed), limit)
    needs = _prefix_needs(stream, names, group_sizes, block_size, max_open_windows, budget)
    if budget is None:
        budget = math.ceil(needs[-1][0] / windows_per_step) * windows_per_step
    target = budget  # lowered by whole steps until the longest prefix that fits it has enough documents
    while True:
        prefix = bisect.bisect_right(needs, target, key=lambda need: need[0]) - 1
        while not needs[prefix][2]:  # no pair waits for its mismatched partner
            prefix -= 1
        if needs[prefix][1] + max_empty_windows >= target:
            break
        target = (needs[prefix][1] + max_empty_windows) // windows_per_step * windows_per_step
        if target == 0:
            raise ValueError(
                f"the data cannot fill even one step of {windows_per_step} windows in every setting "
                f"({needs[-1][1]} documents); lower the batch size or add data"
            )
    seen = list(itertools.islice(_stream(units, seed), prefix))
    settings = {}
    for name in names:
        packed = pack(seen, block_size, name, max_open_windows, group_sizes)
        partners = {doc[0].unit: doc[1].unit for window in packed for doc in window if len(doc) == 2}
        settings[name] = SettingPlan(split_to(packed, target, max_empty_windows), len(packed),
                                     partners if name == "mismatched_bridges" else None)  # fmt: skip
    seen_keys = [unit.key for unit in seen]
    return PackingPlan(target // windows_per_step, budget // windows_per_step, windows_per_step, seen_keys, settings,
                       unavailable)  # fmt: skip


class BridgePackingCollator:
    """Planned windows -> B rows of ``block_size`` with document-isolated attention: position ids restart at
    each document, labels are -100 at segment starts, padding is a sequence of its own, and there is no
    ``attention_mask`` (transformers builds the per-document mask from the position ids; flash kernels need
    ``train_common.packed_batch``'s flattened row)."""

    def __init__(self, block_size: int, pad_token_id: int):
        if block_size < 2:
            raise ValueError(f"block_size must be at least 2, got {block_size}")
        self.block_size, self.pad_token_id = block_size, pad_token_id

    def window_features(self, window: list[tuple], segment_tokens: Callable[[Segment], Sequence[int]]) -> dict:
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

    def __call__(self, features: list[dict]) -> dict[str, torch.Tensor]:
        batch: dict[str, list[list[int]]] = {"input_ids": [], "position_ids": [], "labels": []}
        for feature in features:
            padding = self.block_size - len(feature["input_ids"])
            if padding < 0:
                raise ValueError(f"window of {len(feature['input_ids'])} tokens exceeds block_size {self.block_size}")
            batch["input_ids"].append(list(feature["input_ids"]) + [self.pad_token_id] * padding)
            batch["position_ids"].append(list(feature["position_ids"]) + list(range(padding)))
            batch["labels"].append(list(feature["labels"]) + [-100] * padding)
        return {key: torch.tensor(rows, dtype=torch.long) for key, rows in batch.items()}


# ---- Audit: a plan's guarantees measured from the features the collator gives ----------------------


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _percent(part: int, total: int) -> float | None:
    return round(100.0 * part / total, 4) if total else None


def audit_windows(
    planned: SettingPlan,
    collator: BridgePackingCollator,
    segment_tokens: Callable[[Segment], Sequence[int]],
    units: Iterable[PackingUnit],
    *,
    unit_names: Callable[[object], str],
    vocab_size: int,
) -> dict:
    """One setting's windows measured from their features: counts, pair co-location, multiset hashes (segments,
    tokens, targets, units seen) and, mismatched, whether each pair is one document with its planned partner."""
    windows, partners = planned.windows, planned.partners
    units = {unit.key: unit for unit in units}
    counts = np.zeros((2, vocab_size), np.int64)  # tokens, targets
    digests, seen, places = [], Counter(), {}
    real = 0
    for start in range(0, len(windows), 1024):  # one bincount over many windows: fast
        chunk = windows[start : start + 1024]
        features = [collator.window_features(window, segment_tokens) for window in chunk]
        for w, (window, feature) in enumerate(zip(chunk, features), start):
            offset = 0
            for d, document in enumerate(window):
                for segment in document:
                    tokens = np.asarray(segment_tokens(segment), dtype="<i4")
                    digests.append(hashlib.blake2b(tokens.tobytes(), digest_size=16).digest())
                    if segment.part == 0:
                        seen[segment.key] += 1
                    if units[segment.key].is_pair:  # where each half lies: (window, document, first position)
                        place = (w, d, feature["position_ids"][offset])
                        places.setdefault(segment.unit, [None, None])[segment.part] = place
                    offset += len(tokens)
            real += offset
        ids, labels = (np.concatenate([np.asarray(f[k], np.int64) for f in features]) for k in ("input_ids", "labels"))
        counts += [np.bincount(ids, minlength=vocab_size), np.bincount(labels[labels != -100], minlength=vocab_size)]
    co_located = sum(1 for first, second in places.values() if first[0] == second[0])
    seen_text = "\n".join(f"{unit_names(key)}\t{count}" for key, count in sorted(seen.items()))
    return {
        "windows": len(windows),
        "documents": sum(len(window) for window in windows),
        "segments": len(digests),
        "real_tokens": real,
        "target_tokens": int(counts[1].sum()),
        "real_token_fraction": round(real / (len(windows) * collator.block_size), 6),
        "empty_windows": sum(1 for window in windows if not window),
        "pairs": {
            "total": len(places),
            "co_located": co_located,
            "split": len(places) - co_located,
            "co_located_percent": _percent(co_located, len(places)),
            "attending_each_other": sum(1 for first, second in places.values() if _one_document(first, second)),
        },
        **({"mismatched_pairs": _mismatched_pairs(partners, places, units)} if partners is not None else {}),
        "hashes": {
            "segments_multiset_sha256": _sha256(b"".join(sorted(digests))),
            "tokens_multiset_sha256": _sha256(counts[0].tobytes()),
            "targets_multiset_sha256": _sha256(counts[1].tobytes()),
            "documents_seen_sha256": _sha256(seen_text.encode()),
        },
    }


def _one_document(first, second) -> bool:
    """Whether a second half continues the first half's document (and so attends to it)."""
    return bool(first and second and first[:2] == second[:2] and second[2] != 0)


def _mismatched_pairs(partners: dict, places: dict, units: dict) -> dict:
    """Each pair's first half with its partner's second: one document, another pair of its group, each half once."""
    halves = [(places.get(a, [None])[0], places.get(b, [None, None])[1]) for a, b in partners.items()]
    together = sum(1 for first, second in halves if first and second and first[0] == second[0])
    return {
        "planned": len(partners),
        "co_located": together,
        "co_located_percent": _percent(together, len(partners)),
        "attending_each_other": sum(1 for first, second in halves if _one_document(first, second)),
        "with_own_partner": sum(1 for a, b in partners.items() if a[1] == b[1]),
        "same_language": sum(1 for a, b in partners.items() if units[a[1]].group != units[b[1]].group),
        "each_half_once": sorted(partners) == sorted(partners.values()) == sorted(places),
    }


def equal_across_settings(audits: dict[str, dict]) -> dict[str, bool]:
    """Whether each hash, the window count and the real tokens are the same in every setting's audit."""
    first, *others = audits.values()
    equal = {name.removesuffix("_sha256"): all(other["hashes"][name] == value for other in others)
             for name, value in first["hashes"].items()}  # fmt: skip
    return equal | {name: all(other[name] == first[name] for other in others) for name in ("windows", "real_tokens")}


def plan_guarantees(audits: dict[str, dict], setting: str) -> tuple[list, list]:
    """(broken, unchecked): the guarantees the settings' audits break (``setting``: this run's), and those that
    could not be checked (never counted as holding)."""
    broken, unchecked = [], []
    for name in sorted(audits, key=lambda name: name != setting):
        audit, where = audits[name], f"{name} (this run)" if name == setting else name
        pairs, mismatched = audit["pairs"], audit.get("mismatched_pairs")
        if not pairs["total"]:
            unchecked.append(
                f"co-location: no pair is in the planned windows of {where} ({audit['windows']} windows, "
                f"{audit['documents']} documents); plan more steps or add pairs to the data"
            )
            continue
        if pairs["co_located_percent"] != (expected := 100.0 if name == "bridges" else 0.0):
            broken.append(f"{pairs['co_located_percent']}% of pairs co-located in {where}, expected {expected}%")
        if name == "bridges" and pairs["attending_each_other"] != pairs["total"]:
            broken.append(f"some bridged pairs are not one attention document in {where}")
        if name == "mismatched_bridges" and (
            mismatched is None
            or not mismatched["attending_each_other"] == mismatched["planned"] == pairs["total"]
            or mismatched["with_own_partner"]
            or mismatched["same_language"]
            or not mismatched["each_half_once"]
        ):
            broken.append(f"the planned mismatched partners are not each one document of another pair's "
                          f"English and target halves in {where}: {mismatched}")  # fmt: skip
    broken += [
        f"{name} differs between the settings" for name, same in equal_across_settings(audits).items() if not same
    ]
    return broken, unchecked
