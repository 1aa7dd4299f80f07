"""train_common.packed_batch and its guard: which layout each attention implementation gets, that no
batch of several rows without sequence boundaries reaches a flash kernel, and that the flattened and
the padded layout carry the same tokens, labels and documents (and give the same logits with sdpa)."""

from collections import Counter

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, Trainer, TrainingArguments

import train_common
from run_pretrain import PackedBlockCollator, pack_documents
from train_common import SEQUENCE_BOUNDARY_KEYS, check_flash_batch, guard_flash_attention_inputs

pytestmark = pytest.mark.usefixtures("one_torch_thread")

FLASH_IMPLEMENTATIONS = [
    "flash_attention_2",
    "flash_attention_3",
    "flash_attention_4",
    "paged|flash_attention_2",
    "kernels-community/flash-attn",
    "kernels-community/vllm-flash-attn3",
]
# Documents of different lengths (each opening with the start token 0), packed into windows of 8.
DOCUMENTS = [[0, 11, 12, 13], [0, 21, 22], [0, 31, 32, 33, 34, 35], [0, 41], [0, 51, 52, 53, 54], [0, 61, 62]]
DOCUMENTS += [[0, 71, 72, 73, 74]]  # 28 tokens: 3 windows of 8, the tail of 4 dropped
BLOCK = 8


def expected_boundaries(documents=DOCUMENTS, block=BLOCK) -> list[int]:
    """Sequence starts of the windowed corpus, from the document lengths: every document start and
    every window start below the last full window, then the total."""
    total = sum(map(len, documents)) // block * block
    doc_starts, offset = set(), 0
    for doc in documents:
        doc_starts.add(offset)
        offset += len(doc)
    return sorted({s for s in doc_starts if s < total} | set(range(0, total, block))) + [total]


def windows(documents=DOCUMENTS, block=BLOCK) -> list[dict]:
    packed = pack_documents({"input_ids": documents}, block_size=block)
    return [{"input_ids": i, "position_ids": p} for i, p in zip(packed["input_ids"], packed["position_ids"])]


def document_spans(position_ids: torch.Tensor) -> list[tuple[int, int]]:
    """(start, end) of every sequence in the flat token order, from the restarting position ids."""
    flat = position_ids.reshape(-1).tolist()
    starts = [i for i, p in enumerate(flat) if p == 0]
    return list(zip(starts, starts[1:] + [len(flat)]))


@pytest.mark.parametrize("attn_implementation", FLASH_IMPLEMENTATIONS)
def test_the_guard_refuses_several_rows_without_sequence_boundaries_for_a_flash_kernel(attn_implementation):
    padded = PackedBlockCollator(attn_implementation="sdpa")(windows())
    assert padded["input_ids"].shape[0] == 3 and "cu_seq_lens_q" not in padded
    with pytest.raises(ValueError, match="would reach the flash kernel.*attend across documents"):
        check_flash_batch(padded, attn_implementation)
    check_flash_batch(padded, "sdpa")  # sdpa builds the document mask from the position ids of every row
    one_row = PackedBlockCollator(attn_implementation="sdpa")(windows()[:1])
    check_flash_batch(one_row, attn_implementation)  # one row: flash infers boundaries from position ids


def test_a_model_with_a_flash_kernel_refuses_such_a_batch_before_its_forward(tiny_model_dir):
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    guard_flash_attention_inputs(model)
    model.config._attn_implementation = "flash_attention_2"  # the hook fires before any kernel would run
    padded = PackedBlockCollator(attn_implementation="sdpa")(windows())
    with pytest.raises(ValueError, match="batch of 3 rows without cu_seq_lens_q"):
        model(**padded)
    with pytest.raises(ValueError, match="batch of 3 rows"):
        model(padded["input_ids"], position_ids=padded["position_ids"])


@pytest.mark.parametrize("attn_implementation", [*FLASH_IMPLEMENTATIONS, "some-org/unknown-kernel"])
@pytest.mark.parametrize("n_windows", [1, 2, 3])
def test_the_collator_gives_flash_and_unknown_kernels_one_row_with_sequence_boundaries(attn_implementation, n_windows):
    batch = PackedBlockCollator(attn_implementation=attn_implementation)(windows()[:n_windows])
    assert batch["input_ids"].shape == batch["position_ids"].shape == batch["labels"].shape == (1, n_windows * BLOCK)
    assert "attention_mask" not in batch and all(batch[key] is not None for key in SEQUENCE_BOUNDARY_KEYS)
    check_flash_batch(batch, attn_implementation)
    # Asked for B rows anyway, the collator refuses rather than hand a flash kernel a leaking batch.
    if train_common.is_flash_attention(attn_implementation) and n_windows > 1:
        with pytest.raises(ValueError, match="would reach the flash kernel"):
            PackedBlockCollator(attn_implementation=attn_implementation, flatten=False)(windows()[:n_windows])


@pytest.mark.parametrize("attn_implementation", ["sdpa", "eager", "flex_attention"])
def test_kernels_that_mask_from_position_ids_keep_one_row_per_window(attn_implementation):
    batch = PackedBlockCollator(attn_implementation=attn_implementation)(windows())
    assert set(batch) == {"input_ids", "position_ids", "labels"} and batch["input_ids"].shape == (3, BLOCK)


def test_flattened_and_padded_layouts_carry_the_same_tokens_labels_and_documents():
    examples = windows()
    padded = PackedBlockCollator(attn_implementation="sdpa")(examples)
    flat = PackedBlockCollator(attn_implementation="flash_attention_2")(examples)
    # the same tokens and labels, in the same order (window after window), hence the same multisets
    assert flat["input_ids"].tolist()[0] == padded["input_ids"].reshape(-1).tolist()
    assert flat["labels"].tolist()[0] == padded["labels"].reshape(-1).tolist()
    assert Counter(flat["labels"].flatten().tolist()) == Counter(padded["labels"].flatten().tolist())
    # -100 exactly at every document (and window) start, nowhere else
    flat_positions = flat["position_ids"][0]
    assert ((flat["labels"][0] == -100) == (flat_positions == 0)).all()
    # the sequence boundaries: the documents of the padded layout (its restarting position ids, row
    # after row) and of the corpus itself (document lengths, cut at window ends)
    spans = document_spans(padded["position_ids"])
    assert flat["cu_seq_lens_q"].tolist() == [start for start, _ in spans] + [3 * BLOCK] == expected_boundaries()
    assert flat["cu_seq_lens_q"].dtype == torch.int32 and flat["cu_seq_lens_k"] is flat["cu_seq_lens_q"]
    assert flat["max_length_q"] == flat["max_length_k"] == max(end - start for start, end in spans)
    assert isinstance(flat["max_length_q"], int)  # a Python int: the kernel does not sync to read it
    tokens = flat["input_ids"][0].tolist()
    assert sum((tokens[a:b] for a, b in spans), []) == sum(DOCUMENTS, [])[: 3 * BLOCK]


@pytest.mark.parametrize("attn_implementation", ["sdpa", "eager"])
def test_one_flattened_row_gives_each_document_the_logits_of_the_padded_layout(tiny_model_dir, attn_implementation):
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, attn_implementation=attn_implementation).eval()
    generator = torch.Generator().manual_seed(0)
    documents = [
        [0, *torch.randint(2, len(tokenizer), (n - 1,), generator=generator).tolist()] for n in (9, 5, 12, 7, 3, 12)
    ]
    examples = windows(documents, block=16)
    assert len(examples) == 3
    logits = {}
    for name, flatten in (("padded", False), ("flattened", True)):
        batch = PackedBlockCollator(attn_implementation=attn_implementation, flatten=flatten)(examples)
        batch.pop("labels")
        with torch.no_grad():
            out = model(**batch).logits
        logits[name] = out.reshape(-1, out.shape[-1])
    assert (logits["flattened"] - logits["padded"]).abs().max() < 1e-5
    # and both are per document: the last document (the last 12 tokens of window 3) alone gives the same logits
    alone = PackedBlockCollator()([{"input_ids": documents[-1], "position_ids": list(range(12))}])
    with torch.no_grad():
        alone_logits = model(input_ids=alone["input_ids"], position_ids=alone["position_ids"]).logits[0]
    assert (logits["flattened"][-12:] - alone_logits).abs().max() < 1e-5


def test_the_trainer_hands_the_sequence_boundaries_to_the_model(tiny_model_dir, tmp_path):
    # The collator runs after the Trainer removes unused dataset columns, and _prepare_inputs keeps
    # the keys: cu_seq_lens_q/k and max_length_q/k reach model(**inputs).
    from datasets import Dataset

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    dataset = Dataset.from_list([{k: list(map(int, v)) for k, v in w.items()} for w in windows()])
    args = TrainingArguments(output_dir=str(tmp_path), per_device_train_batch_size=3, report_to="none", use_cpu=True)
    trainer = Trainer(model=model, args=args, train_dataset=dataset, data_collator=PackedBlockCollator(flatten=True))
    inputs = trainer._prepare_inputs(next(iter(trainer.get_train_dataloader())))
    assert set(SEQUENCE_BOUNDARY_KEYS) <= set(inputs) and inputs["input_ids"].shape == (1, 3 * BLOCK)
    boundaries = inputs["cu_seq_lens_q"].tolist()  # of the windows in the sampler's (shuffled) order
    assert boundaries[:-1] == (inputs["position_ids"][0] == 0).nonzero().flatten().tolist()
    lengths = Counter(b - a for a, b in zip(boundaries, boundaries[1:]))
    expected = expected_boundaries()
    assert lengths == Counter(b - a for a, b in zip(expected, expected[1:])) and inputs["max_length_q"] == max(lengths)


# --------------------------------------------------------------------------------------
# run_cpt.py: the BridgePackingCollator gives each kernel its layout, and the isolation check runs
# on the run's own kernel and layout
# --------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def cpt_plan(tmp_path_factory, tiny_model_dir):
    """A real plan of the three settings (windows of 64 tokens, 2 per step, 2 steps) and its token store."""
    from test_cpt_refusals import small_dataset

    import run_cpt

    data = small_dataset(tmp_path_factory.mktemp("cpt_layout"), tiny_model_dir)
    args = run_cpt.CPTArguments(lang="bo", model_name_or_path=str(tiny_model_dir), bridges=True,
                                dataset_path=str(data), block_size=64)  # fmt: skip
    tokenized = run_cpt.tokenize_dataset(
        run_cpt.load_cpt_dataset(args)[0], AutoTokenizer.from_pretrained(tiny_model_dir), args, seed=0
    )
    store = run_cpt.SegmentStore(tokenized)
    units = run_cpt.packing_units(tokenized, store)
    plan = run_cpt.plan_packing(units, block_size=64, windows_per_step=2, seed=0, max_steps=2)
    return {"plan": plan, "store": store, "units": units, "tokenized": tokenized, "data": data}


def cpt_features(cpt_plan, setting="bridges", n_windows=3):
    import run_cpt

    collator = run_cpt.BridgePackingCollator(64, 1)
    windows = cpt_plan["plan"].setting(setting).windows[:n_windows]
    return [collator.window_features(window, cpt_plan["store"].segment_tokens) for window in windows]


@pytest.mark.parametrize("setting", ["bridges", "no_bridges", "mismatched_bridges"])
@pytest.mark.parametrize("attn_implementation", [*FLASH_IMPLEMENTATIONS, "some-org/unknown-kernel"])
def test_the_cpt_collator_gives_flash_kernels_one_row_with_the_windows_of_the_padded_rows(
    cpt_plan, attn_implementation, setting
):
    import run_cpt

    features = cpt_features(cpt_plan, setting)
    padded = run_cpt.BridgePackingCollator(64, 1, attn_implementation="sdpa")(features)
    flat = run_cpt.BridgePackingCollator(64, 1, attn_implementation=attn_implementation)(features)
    assert set(padded) == {"input_ids", "position_ids", "labels"} and padded["input_ids"].shape == (3, 64)
    assert flat["input_ids"].shape == flat["position_ids"].shape == flat["labels"].shape == (1, 3 * 64)
    assert "attention_mask" not in flat and all(flat[key] is not None for key in SEQUENCE_BOUNDARY_KEYS)
    check_flash_batch(flat, attn_implementation)
    # the same windows, tokens, positions and labels, window after window
    for key in ("input_ids", "position_ids", "labels"):
        assert flat[key][0].tolist() == padded[key].reshape(-1).tolist()
    # sequences: every document of the plan, then each window's padding, at its offset in the row
    expected = []
    for w, feature in enumerate(features):
        starts = [i for i, p in enumerate(feature["position_ids"]) if p == 0]
        expected += [w * 64 + s for s in starts] + (
            [w * 64 + len(feature["input_ids"])] * (len(feature["input_ids"]) < 64)
        )
    assert flat["cu_seq_lens_q"].tolist() == expected + [3 * 64]
    assert ((flat["labels"][0] == -100) | (flat["position_ids"][0] != 0)).all()  # each sequence opens unpredicted


@pytest.mark.parametrize("attn_implementation", ["sdpa", "eager", "flex_attention"])
def test_the_cpt_collator_keeps_one_padded_row_per_window_for_kernels_that_mask_from_position_ids(
    cpt_plan, attn_implementation
):
    import run_cpt

    batch = run_cpt.BridgePackingCollator(64, 1, attn_implementation=attn_implementation)(cpt_features(cpt_plan))
    assert set(batch) == {"input_ids", "position_ids", "labels"} and batch["input_ids"].shape == (3, 64)


def test_the_cpt_audit_is_computed_from_window_features_and_matches_what_every_layout_feeds(cpt_plan, tiny_model_dir):
    # The audit's multiset hashes are the same whatever the layout, and they count exactly the tokens
    # and loss targets that the flattened (flash) batches of all planned windows carry.
    import numpy as np

    import run_cpt

    vocab = len(AutoTokenizer.from_pretrained(tiny_model_dir))
    plan, store = cpt_plan["plan"], cpt_plan["store"]
    pair_rows = {u.key for u in cpt_plan["units"] if u.is_pair}
    doc_keys = run_cpt.document_keys(cpt_plan["tokenized"])
    assert list(plan.settings) == ["bridges", "no_bridges", "mismatched_bridges"]
    for planned in plan.settings.values():
        audits = {
            kernel: run_cpt.audit_windows(
                planned.windows,
                store,
                run_cpt.BridgePackingCollator(64, 1, attn_implementation=kernel),
                pair_rows,
                doc_keys,
                vocab,
            )  # fmt: skip
            for kernel in ("sdpa", "flash_attention_2")
        }
        assert audits["sdpa"] == audits["flash_attention_2"]
        collator = run_cpt.BridgePackingCollator(64, 1, attn_implementation="flash_attention_2")
        batch = collator([collator.window_features(w, store.segment_tokens) for w in planned.windows])
        real = torch.cat(
            [
                batch["input_ids"][0][
                    w * 64 : w * 64 + len(collator.window_features(window, store.segment_tokens)["input_ids"])
                ]
                for w, window in enumerate(planned.windows)
            ]
        )
        targets = batch["labels"][0][batch["labels"][0] != -100]
        tokens_sha = run_cpt._sha256(np.bincount(real.numpy(), minlength=vocab).astype(np.int64).tobytes())
        targets_sha = run_cpt._sha256(np.bincount(targets.numpy(), minlength=vocab).astype(np.int64).tobytes())
        assert audits["sdpa"]["hashes"]["tokens_multiset_sha256"] == tokens_sha
        assert audits["sdpa"]["hashes"]["targets_multiset_sha256"] == targets_sha
        assert audits["sdpa"]["target_tokens"] == len(targets)


def test_one_flattened_cpt_row_gives_each_document_the_logits_of_the_padded_layout_with_sdpa(cpt_plan, tiny_model_dir):
    import run_cpt

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, attn_implementation="sdpa").eval()
    features = cpt_features(cpt_plan)
    logits = {}
    for name, kernel in (("padded", "sdpa"), ("flattened", "flash_attention_2")):
        batch = run_cpt.BridgePackingCollator(64, 1, attn_implementation=kernel)(features)
        batch.pop("labels")
        with torch.no_grad():
            out = model(**batch, use_cache=False).logits
        logits[name] = out.reshape(-1, out.shape[-1])
    assert logits["flattened"].shape == logits["padded"].shape == (3 * 64, model.config.vocab_size)
    assert (logits["flattened"] - logits["padded"]).abs().max() < 1e-5
    # per document: the last document of the first window, alone, gives the same logits
    positions = features[0]["position_ids"]
    start = max(i for i, p in enumerate(positions) if p == 0)
    alone = run_cpt.BridgePackingCollator(64, 1)([{key: feature[start:] for key, feature in features[0].items()}])
    with torch.no_grad():
        alone_logits = model(input_ids=alone["input_ids"], position_ids=alone["position_ids"]).logits[0]
    end = len(positions)
    assert (logits["flattened"][start:end] - alone_logits[: end - start]).abs().max() < 1e-5


@pytest.mark.parametrize(
    "kernel, holds", [("sdpa", True), ("eager", True), ("varlen_reference", True), ("causal_across_documents", False)]
)
def test_the_cpt_isolation_check_runs_two_windows_in_the_kernels_layout_and_refuses_a_leaking_kernel(
    cpt_plan, tiny_model_dir, kernel, holds
):
    # varlen_reference (a CPU stand-in for a flash varlen kernel, reading only cu_seq_lens) and
    # causal_across_documents (a kernel that ignores boundaries, as flash does with B rows) come from
    # tests/test_pretrain.py; both get the flattened layout, as every kernel outside sdpa/eager/flex does.
    import test_pretrain  # noqa: F401  (registers the two kernels)

    import run_cpt

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    model.config._attn_implementation = kernel
    collator = run_cpt.BridgePackingCollator(64, 1, attn_implementation=kernel)
    result = run_cpt.check_plan_isolation(model, cpt_plan["plan"].bridges.windows, cpt_plan["store"], collator)
    assert result["windows_in_batch"] == 2 and result["documents"] >= 3
    assert result["layout"] == ("padded" if kernel in ("sdpa", "eager") else "flattened")
    assert result["holds"] is holds
    if holds:
        assert (
            result["max_logit_diff_other_documents_changed"] < 1e-6 and result["max_logit_diff_packed_vs_alone"] < 1e-5
        )
    else:
        assert result["max_logit_diff_other_documents_changed"] > 1e-3
        broken, _ = run_cpt.judge_guarantees(
            {"pairs": {"total": 1, "co_located_percent": 100.0, "attending_each_other": 1}, "max_window_tokens": 64},
            {"no_bridges": {"pairs": {"total": 1, "co_located_percent": 0.0}}}, {}, result, "bridges", 64,
        )  # fmt: skip
        assert "attention crosses documents with attn_implementation=causal_across_documents" in broken[0]


def test_the_cpt_isolation_check_sees_a_leak_across_windows_of_one_document_each(cpt_plan, tiny_model_dir):
    # Windows of one document each: in one flattened row they are still two documents side by side.
    import test_pretrain  # noqa: F401

    import run_cpt

    one_per_window = [[document] for window in cpt_plan["plan"].no_bridges.windows for document in window]
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    model.config._attn_implementation = "causal_across_documents"
    collator = run_cpt.BridgePackingCollator(64, 1, attn_implementation="causal_across_documents")
    result = run_cpt.check_plan_isolation(model, one_per_window, cpt_plan["store"], collator)
    assert result["windows_in_batch"] == 2 and result["holds"] is False


@pytest.mark.parametrize("kernel", ["flex_attention", "flash_attention_2", "kernels-community/flash-attn"])
def test_run_cpt_refuses_flex_and_flash_on_the_cpu_before_anything_is_written(cpt_plan, tiny_model_dir, tmp_path,
                                                                              kernel):  # fmt: skip
    import run_cpt

    data = cpt_plan["data"]
    before = sorted(p.name for p in data.iterdir())
    run = tmp_path / "run"
    with pytest.raises(ValueError, match=rf"--attn_implementation {kernel} does not train on the CPU.*Nothing was"):
        run_cpt.main(["--model_name_or_path", str(tiny_model_dir), "--dataset_path", str(data), "--lang", "bo",
                      "--bridges", "--block_size", "64", "--output_dir", str(run), "--max_steps", "1",
                      "--report_to", "none", "--use_cpu", "--attn_implementation", kernel])  # fmt: skip
    assert not run.exists() and sorted(p.name for p in data.iterdir()) == before
