"""packing.py: its guarantees as property tests over many seeded random cases, the collated tensors,
document-isolated attention in a real model, and that it runs with the standard library, numpy and torch only."""

import random
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest
import torch

from packing import (
    SETTINGS,
    BridgePackingCollator,
    PackingUnit,
    Segment,
    mismatched_unavailable,
    pack,
    pair_group_sizes,
    plan_packing,
    shuffled,
    split_to,
)

REPO_ROOT = Path(__file__).resolve().parents[1]


# --------------------------------------------------------------------------------------
# An independent checker of a plan: it reads the windows as plain data and knows nothing of
# how the packer chose them.
# --------------------------------------------------------------------------------------


def random_units(rng: random.Random, block_size: int) -> list[PackingUnit]:
    units = []
    groups = rng.choice([[None], ["en", "tgt"]])  # one pair order, or a coin per pair
    half = rng.random() < 0.5  # pairs of at most half a window: any two can be mismatched partners
    for row in range(rng.randint(1, 50)):
        scale = rng.choice([0.05, 0.2, 0.5, 1.0])  # mostly small documents, some near a window
        if rng.random() < 0.5:
            pair_size = block_size // 2 if half else block_size
            first = rng.randint(2, max(2, min(pair_size - 2, int(block_size * scale))))
            second = rng.randint(2, max(2, min(pair_size - first, int(block_size * scale))))
            units.append(PackingUnit(row, (first, second), True, rng.choice(groups)))
        else:
            n_segments = rng.choice([1, 1, 1, 2, 3])
            lengths = tuple(rng.randint(2, max(2, int(block_size * scale))) for _ in range(n_segments))
            units.append(PackingUnit(row, lengths, False))
    return units


def check_windows(windows, units_by_key, block_size, setting, expected_segments: Counter, partners=None):
    """Every guarantee that can be read off one setting's windows (and, mismatched, the planned partners)."""
    placed = Counter()
    for window in windows:
        length = 0
        pair_halves_here = Counter()
        for document in window:
            keys = [segment.unit for segment in document]
            unit = units_by_key[keys[0][1]]
            parts = [segment.part for segment in document]
            if unit.is_pair and setting != "no_bridges":
                assert parts == [0, 1], "a pair document is a first half then a second half"
                if setting == "bridges":
                    assert keys[0] == keys[1], "with bridges a pair is one document"
                else:
                    partner = units_by_key[keys[1][1]]
                    assert partner.is_pair and keys[0][1] != keys[1][1], "a mismatched pair with its own partner"
                    assert keys[0][0] == keys[1][0] and unit.group == partner.group, "partner of another pass or group"
                    assert partners is None or partners[keys[0]] == keys[1], "not the planned partner"
            else:
                assert len(parts) == 1 and len(keys) == 1, "a segment is a document of its own"
            for segment in document:
                length += units_by_key[segment.key].segment_lengths[segment.part]
                placed[segment.unit, segment.part] += 1
                if unit.is_pair:
                    pair_halves_here[segment.unit] += 1
        assert length <= block_size, "window over block size"
        if setting == "bridges":
            assert all(count == 2 for count in pair_halves_here.values())
        else:
            assert all(count == 1 for count in pair_halves_here.values()), "pair halves share a window"
    assert placed == expected_segments, "segments missing, duplicated or invented"


def expected_segments(keys, units_by_key) -> Counter:
    return Counter((key, part) for key in keys for part in range(len(units_by_key[key[1]].segment_lengths)))


# --------------------------------------------------------------------------------------
# Property tests
# --------------------------------------------------------------------------------------


def cases(chunk: int, per_chunk: int = 15):
    """Seeded random cases, run in chunks (a failure names its case number)."""
    return range(chunk * per_chunk, (chunk + 1) * per_chunk)


@pytest.mark.parametrize("chunk", range(20))
def test_pack_keeps_every_guarantee_for_one_pass_of_random_documents(chunk):
    for case in cases(chunk):
        try:
            check_pack_case(case)
        except AssertionError as error:
            raise AssertionError(f"case {case}: {error}") from error


def check_pack_case(case):
    rng = random.Random(case)
    block_size = rng.choice([4, 8, 16, 33, 64, 128, 300])
    units = random_units(rng, block_size)
    units_by_key = {u.key: u for u in units}
    stream = shuffled(units, seed=rng.randint(0, 10**6), data_pass=0)
    max_open = rng.choice([1, 2, 4, 64])
    settings = SETTINGS if mismatched_unavailable(units, block_size) is None else SETTINGS[:2]
    packed = {name: pack(stream, block_size, name, max_open) for name in settings}
    for setting, windows in packed.items():
        # Every document exactly once per pass, none split, none over a window, co-location 100/0/0.
        check_windows(
            windows, units_by_key, block_size, setting, expected_segments([u.key for u in stream], units_by_key)
        )
        assert all(windows), "no empty window from the packer"
    # Same multiset of segments in every setting (the windows differ only in grouping).
    flatten = lambda ws: Counter(s for w in ws for d in w for s in d)  # noqa: E731
    assert all(flatten(windows) == flatten(packed["bridges"]) for windows in packed.values())


@pytest.mark.parametrize("chunk", range(20))
def test_plan_gives_both_settings_the_same_documents_in_the_same_number_of_windows(chunk):
    for case in cases(chunk):
        try:
            check_plan_case(case)
        except AssertionError as error:
            raise AssertionError(f"case {case}: {error}") from error


def check_plan_case(case):
    rng = random.Random(10_000 + case)
    block_size = rng.choice([8, 16, 33, 64, 128])
    units = random_units(rng, block_size)
    units_by_key = {u.key: u for u in units}
    per_step = rng.randint(1, 6)
    max_empty = rng.choice([0, per_step - 1])
    budget = {"max_steps": rng.randint(1, 12)} if rng.random() < 0.7 else {"num_epochs": rng.choice([0.5, 1, 2.5])}
    max_open = rng.choice([1, 3, 64])
    try:
        plan = plan_packing(
            units,
            block_size=block_size,
            windows_per_step=per_step,
            seed=case,
            max_open_windows=max_open,
            max_empty_windows=max_empty,
            **budget,
        )
    except ValueError as error:  # only when not even one step can be filled in both settings
        assert "cannot fill even one step" in str(error)
        return
    target = plan.steps * per_step
    assert 1 <= plan.steps <= plan.requested_steps
    assert ("mismatched_bridges" in plan.settings) == (mismatched_unavailable(units, block_size) is None)
    for setting, planned in plan.settings.items():
        windows = planned.windows
        assert len(windows) == target, "every setting gets exactly steps x windows_per_step windows"
        assert sum(1 for w in windows if not w) <= max_empty
        check_windows(windows, units_by_key, block_size, setting, expected_segments(plan.seen, units_by_key),
                      planned.partners)  # fmt: skip
    if "mismatched_bridges" in plan.settings:  # every pair of the plan gives its first half once, gets a second once
        partners = plan.settings["mismatched_bridges"].partners
        assert (
            sorted(partners) == sorted(partners.values()) == sorted(k for k in plan.seen if units_by_key[k[1]].is_pair)
        )
    # The prefix is whole passes over the data, each a permutation of all units, then part of one.
    passes = Counter(key[0] for key in plan.seen)
    assert list(passes) == list(range(len(passes)))
    for data_pass, count in passes.items():
        keys = [key[1] for key in plan.seen if key[0] == data_pass]
        assert len(set(keys)) == len(keys), "a unit twice in one pass"
        if data_pass < len(passes) - 1:
            assert count == len(units), "an earlier pass is incomplete"
    if "num_epochs" in budget:
        assert len(plan.seen) <= budget["num_epochs"] * len(units) + 1
    elif plan.steps == plan.requested_steps:
        # Longest prefix: one more unit would need more windows than the budget in some setting.
        last_pass = len(passes) - 1
        position = passes[last_pass]
        following = shuffled(units, case, last_pass) + shuffled(units, case, last_pass + 1)
        longer = [units_by_key[key[1]]._replace(key=key) for key in plan.seen]
        for unit in following[position:]:  # the next prefix where no pair waits for a mismatched partner
            longer.append(unit)
            try:
                needs = [
                    len(pack(longer, block_size, name, max_open, pair_group_sizes(units))) for name in plan.settings
                ]
            except ValueError as error:
                assert "waits for its mismatched partner" in str(error)
                continue
            assert max(needs) > target
            break


def test_plan_trims_steps_only_when_the_data_cannot_fill_them():
    # Pairs of two 5-token segments in 10-token windows: with bridges each pair fills a window, without
    # bridges the halves of a pair may not share one. Three steps of one window cannot hold the same
    # documents in both settings (three pairs need four windows without bridges); two and four can.
    units = [PackingUnit(row, (5, 5), True) for row in range(10)]
    trimmed = plan_packing(units, block_size=10, windows_per_step=1, seed=0, max_steps=3)
    assert (trimmed.requested_steps, trimmed.steps, len(trimmed.seen)) == (3, 2, 2)
    assert all(len(planned.windows) == 2 for planned in trimmed.settings.values()) and len(trimmed.settings) == 3
    filled = plan_packing(units, block_size=10, windows_per_step=1, seed=0, max_steps=4)
    assert (filled.requested_steps, filled.steps) == (4, 4)  # the data can fill them: no trim
    with_slack = plan_packing(units, block_size=10, windows_per_step=2, seed=0, max_steps=3, max_empty_windows=1)
    assert with_slack.steps == 3  # one all-padding window per step is allowed to fill the gap


def test_plan_is_a_pure_function_of_units_seed_and_sizes():
    rng = random.Random(5)
    units = random_units(rng, 64)
    first = plan_packing(units, block_size=64, windows_per_step=3, seed=7, max_steps=5)
    again = plan_packing(list(units), block_size=64, windows_per_step=3, seed=7, max_steps=5)
    other_seed = plan_packing(units, block_size=64, windows_per_step=3, seed=8, max_steps=5)
    assert first == again
    assert first.seen != other_seed.seen


def test_mismatched_bridges_give_each_first_half_the_second_half_of_another_pair_fixed_per_seed():
    rng = random.Random(3)
    units = [PackingUnit(row, (rng.randint(2, 12), rng.randint(2, 12)), True, "en" if row % 3 else "tgt")
             for row in range(11)] + [PackingUnit(11 + row, (rng.randint(2, 30),), False) for row in range(6)]  # fmt: skip
    units_by_key = {u.key: u for u in units}
    plan = plan_packing(units, block_size=32, windows_per_step=2, seed=7, num_epochs=2)
    assert list(plan.settings) == list(SETTINGS) and plan.seen[-1][0] == 1  # two passes
    # The same segments in every setting, the same number of windows; each pair document is a first half with
    # the second half of its planned partner: another pair, of the same pass and pair order (check_windows).
    for setting, planned in plan.settings.items():
        check_windows(planned.windows, units_by_key, 32, setting, expected_segments(plan.seen, units_by_key),
                      planned.partners)  # fmt: skip
    partners = plan.settings["mismatched_bridges"].partners
    pairs_seen = [key for key in plan.seen if units_by_key[key[1]].is_pair]
    assert sorted(partners) == sorted(partners.values()) == sorted(pairs_seen) and len(pairs_seen) == 22
    assert all(a[1] != b[1] and a[0] == b[0] and units_by_key[a[1]].group == units_by_key[b[1]].group
               for a, b in partners.items())  # fmt: skip
    # One pass's partners are not another's, and the derangement is a function of the seed.
    assert {a[1]: b[1] for a, b in partners.items() if a[0] == 0} != {a[1]: b[1] for a, b in partners.items() if a[0]}
    assert plan_packing(units, block_size=32, windows_per_step=2, seed=7, num_epochs=2) == plan
    other = plan_packing(units, block_size=32, windows_per_step=2, seed=8, num_epochs=2).settings["mismatched_bridges"]
    assert other.partners != partners


def test_a_plan_never_ends_while_a_pair_waits_for_its_mismatched_partner():
    # Five pairs of 5 + 5 tokens, two windows of 20: three pairs fit with bridges and without, but the third
    # pair's mismatched partner would be the fourth, so the plan stops after two (which swap second halves).
    units = [PackingUnit(row, (5, 5), True) for row in range(5)]
    plan = plan_packing(units, block_size=20, windows_per_step=1, seed=0, max_steps=2)
    assert (plan.steps, len(plan.seen)) == (2, 2)
    stream = shuffled(units, seed=0, data_pass=0)
    assert all(len(pack(stream[:3], 20, setting)) == 2 for setting in ("bridges", "no_bridges"))
    with pytest.raises(ValueError, match="waits for its mismatched partner"):
        pack(stream[:3], 20, "mismatched_bridges", group_sizes=pair_group_sizes(units))
    first, second = (unit.key for unit in stream[:2])
    assert plan.settings["mismatched_bridges"].partners == {first: second, second: first}
    # An odd number of pairs: the last three of a pass form one cycle, so every pair of the pass has a partner.
    odd = plan_packing(units, block_size=20, windows_per_step=1, seed=0, num_epochs=1)
    assert len(odd.seen) == 5 and sorted(odd.settings["mismatched_bridges"].partners.values()) == sorted(odd.seen)


def test_split_to_halves_the_fullest_windows_and_keeps_documents_whole():
    windows = [[("a",), ("b",), ("c",), ("d",)], [("e",)]]
    split = split_to(windows, 4)
    assert split == [[("a",)], [("b",)], [("c",), ("d",)], [("e",)]] or split == [
        [("a",), ("b",)],
        [("c",)],
        [("d",)],
        [("e",)],
    ]
    assert split_to(windows, 6, max_empty_windows=1)[-1] == []
    with pytest.raises(ValueError, match="cannot fill"):
        split_to(windows, 7, max_empty_windows=1)


def test_real_token_fraction_meets_the_goals_at_block_2048_on_a_realistic_length_mix():
    from bench.bench_packing import realistic_units

    units = realistic_units(random.Random(0), n_pairs=6000, n_mono=600, block_size=2048)
    stream = shuffled(units, seed=0, data_pass=0)
    real = sum(sum(u.segment_lengths) for u in units)
    fraction = {name: real / (2048 * len(pack(stream, 2048, name))) for name in SETTINGS}
    assert fraction["no_bridges"] >= 0.99
    assert fraction["bridges"] >= 0.98 and fraction["mismatched_bridges"] >= 0.98


# --------------------------------------------------------------------------------------
# Collation
# --------------------------------------------------------------------------------------


def tokens_of(segment):
    rng = random.Random(f"{segment.key}/{segment.part}")
    return [0] + [rng.randint(3, 99) for _ in range(LENGTHS[segment.key][segment.part] - 1)]


LENGTHS = {0: (4, 3), 1: (5,), 2: (2, 6)}
UNITS = [PackingUnit(0, LENGTHS[0], True), PackingUnit(1, LENGTHS[1], False), PackingUnit(2, LENGTHS[2], True)]


def test_collated_window_restarts_positions_per_document_and_masks_segment_starts():
    collator = BridgePackingCollator(block_size=12, pad_token_id=1)
    window = [(Segment(0, 0, 0), Segment(0, 0, 1)), (Segment(0, 1, 0),)]  # bridged pair (4 + 3), then a text (5)
    feature = collator.window_features(window, tokens_of)
    batch = collator([feature, collator.window_features([(Segment(0, 1, 0),)], tokens_of)])
    assert batch["input_ids"].shape == batch["labels"].shape == batch["position_ids"].shape == (2, 12)
    assert "attention_mask" not in batch
    assert batch["position_ids"][0].tolist() == [0, 1, 2, 3, 4, 5, 6, 0, 1, 2, 3, 4]
    pair = tokens_of(Segment(0, 0, 0)) + tokens_of(Segment(0, 0, 1))
    assert batch["input_ids"][0, :7].tolist() == pair
    labels = batch["labels"][0].tolist()
    assert labels[0] == -100 and labels[4] == -100 and labels[7] == -100  # every segment start
    assert labels[1:4] == pair[1:4] and labels[5:7] == pair[5:7]
    # second row: 5 tokens then 7 padding tokens with their own restarting positions, no targets
    assert batch["position_ids"][1].tolist() == [0, 1, 2, 3, 4, 0, 1, 2, 3, 4, 5, 6]
    assert batch["input_ids"][1, 5:].tolist() == [1] * 7
    assert batch["labels"][1, 5:].tolist() == [-100] * 7


def test_collator_refuses_a_window_over_block_size():
    collator = BridgePackingCollator(block_size=6, pad_token_id=1)
    with pytest.raises(ValueError, match="exceeds block_size"):
        collator.window_features([(Segment(0, 1, 0),), (Segment(0, 0, 0),)], tokens_of)
    with pytest.raises(ValueError, match="exceeds block_size"):
        collator([{"input_ids": [1] * 7, "position_ids": list(range(7)), "labels": [1] * 7}])


def test_targets_are_the_same_tokens_in_both_settings():
    plan = plan_packing(UNITS, block_size=12, windows_per_step=2, seed=0, num_epochs=1)
    targets = {}
    for setting, planned in plan.settings.items():
        collator = BridgePackingCollator(12, 1)
        batch = collator([collator.window_features(w, tokens_of) for w in planned.windows])
        labels = batch["labels"][batch["labels"] != -100]
        targets[setting] = (Counter(labels.tolist()), Counter(batch["input_ids"][batch["labels"] != -100].tolist()))
    assert len(targets) == 3 and targets["bridges"] == targets["no_bridges"] == targets["mismatched_bridges"]


# --------------------------------------------------------------------------------------
# Attention: a packed document sees only itself (and, with bridges, a pair sees both halves)
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize("attn_implementation", ["sdpa", "eager"])
def test_each_document_in_a_collated_window_has_the_logits_it_has_alone(tiny_model_dir, attn_implementation):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, attn_implementation=attn_implementation).eval()
    vocab = model.config.vocab_size
    lengths = {0: (9, 7), 1: (11,), 2: (6, 10), 3: (5,)}
    units = [PackingUnit(row, lengths[row], row in (0, 2)) for row in lengths]

    def tokens(segment):
        rng = random.Random(f"tok/{segment.key}/{segment.part}")
        return [0] + [rng.randrange(2, vocab) for _ in range(lengths[segment.key][segment.part] - 1)]

    def logits(input_ids, position_ids=None):
        with torch.no_grad():
            return model(input_ids=input_ids, position_ids=position_ids, use_cache=False).logits

    plan = plan_packing(units, block_size=64, windows_per_step=2, seed=0, num_epochs=1)
    for setting in SETTINGS:
        collator = BridgePackingCollator(64, pad_token_id=1)
        windows = plan.settings[setting].windows
        assert any(len(window) >= 2 for window in windows)  # neighbours a leak would come from
        batch = collator([collator.window_features(window, tokens) for window in windows])
        packed_rows = logits(batch["input_ids"], batch["position_ids"])  # all windows in one batch
        bridged_pairs = 0
        for row, window in enumerate(windows):
            offset = 0
            for document in window:
                ids = [t for segment in document for t in tokens(segment)]
                alone = logits(torch.tensor([ids]))[0]
                torch.testing.assert_close(packed_rows[row, offset : offset + len(ids)], alone, atol=1e-5, rtol=1e-4)
                if len(document) == 2:  # a (bridged or mismatched) pair: its second half attends to the first
                    bridged_pairs += 1
                    second = tokens(document[1])
                    second_alone = logits(torch.tensor([second]))[0]
                    packed_second = packed_rows[row, offset + len(ids) - len(second) : offset + len(ids)]
                    assert (packed_second - second_alone).abs().max() > 1e-3
                offset += len(ids)
        # With (mismatched) bridges both pairs were one document each; without, every half was a document alone.
        assert bridged_pairs == (0 if setting == "no_bridges" else 2)


# --------------------------------------------------------------------------------------
# The module: its worked example holds, with the standard library, numpy and torch only
# --------------------------------------------------------------------------------------


def test_the_worked_example_runs_with_only_the_standard_library_numpy_and_torch():
    program = (
        "import sys\n"
        "for blocked in ('transformers', 'datasets', 'study_common', 'train_common', 'run_cpt'):\n"
        "    sys.modules[blocked] = None  # importing them now fails\n"
        "import doctest, packing\n"
        "result = doctest.testmod(packing)\n"
        "print(result.attempted, result.failed)\n"
        "sys.exit(result.failed > 0 or result.attempted < 5)\n"
    )
    result = subprocess.run([sys.executable, "-c", program], cwd=REPO_ROOT, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stdout + result.stderr
