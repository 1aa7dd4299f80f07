"""train_common.py: packed_batch and its guard (which layout each attention implementation gets, that no batch of
several rows without sequence boundaries reaches a flash kernel, and that the flattened and the padded layout carry
the same tokens, labels and documents and give the same logits with sdpa), through run_pretrain's collator; the
flag parsing and the resume convention of both training scripts."""

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
    assert flat["cu_seq_lens_q"].dtype == torch.int32 and torch.equal(flat["cu_seq_lens_k"], flat["cu_seq_lens_q"])
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


@pytest.mark.parametrize("script", ["run_pretrain", "run_cpt"])
def test_flags_that_training_arguments_refuse_together_are_an_input_error_with_its_message(script, tmp_path):
    import run_cpt
    import run_pretrain
    from study_common import InputError

    parse = {"run_pretrain": run_pretrain.parse_arguments, "run_cpt": run_cpt.parse_args}[script]
    flags = ["--output_dir", str(tmp_path / "out"), "--save_strategy", "steps", "--load_best_model_at_end"]
    flags += {"run_pretrain": ["--train_file", "en.txt"], "run_cpt": ["--lang", "bo", "--bridges"]}[script]
    with pytest.raises(InputError, match="--load_best_model_at_end requires the save and eval strategy to match"):
        parse(flags)
    (tmp_path / "flags.json").write_text(
        '{"output_dir": "out", "save_strategy": "steps", "load_best_model_at_end": true}'
    )
    with pytest.raises(InputError, match="--load_best_model_at_end requires"):  # a .json of flags, as run_clm.py
        parse([str(tmp_path / "flags.json")])


def test_one_resume_convention_for_both_training_scripts(tmp_path):
    from study_common import InputError
    from train_common import resume_checkpoint

    run = tmp_path / "run"
    assert resume_checkpoint(None, run) is None  # a new folder starts afresh
    with pytest.raises(InputError, match=r"latest: no checkpoint-N in"):
        resume_checkpoint("latest", run)
    (run / "checkpoint-2").mkdir(parents=True)
    (run / "checkpoint-10").mkdir()
    with pytest.raises(InputError, match=r"already holds .*checkpoint-10\. Pass --resume_from_checkpoint"):
        resume_checkpoint(None, run)  # never an earlier run's checkpoints without saying so
    for value in ("latest", "true", "last", "True"):
        assert resume_checkpoint(value, run) == str(run / "checkpoint-10")
    assert resume_checkpoint(str(run / "checkpoint-2"), run) == str(run / "checkpoint-2")
    with pytest.raises(InputError, match=r"checkpoint-7: no such checkpoint folder"):
        resume_checkpoint(str(run / "checkpoint-7"), run)


@pytest.mark.parametrize("script", ["run_pretrain", "run_cpt"])
def test_pushing_every_checkpoint_never_skips_one_while_another_uploads(script, tmp_path):
    import run_cpt
    import run_pretrain

    parse = {"run_pretrain": run_pretrain.parse_arguments, "run_cpt": run_cpt.parse_args}[script]
    flags = ["--output_dir", str(tmp_path / "out"), "--hub_model_id", "org/model", "--push_to_hub"]
    flags += {"run_pretrain": ["--train_file", "en.txt"],
              "run_cpt": ["--dataset_path", str(tmp_path), "--model_name_or_path", "base", "--bridges"]}[script]  # fmt: skip
    assert parse([*flags, "--hub_strategy", "all_checkpoints"])[-1].hub_always_push is True
    assert parse([*flags, "--hub_strategy", "every_save"])[-1].hub_always_push is False
