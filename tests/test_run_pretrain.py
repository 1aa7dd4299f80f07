"""run_pretrain.py: filtering, tokenizer, packing with document-isolated attention, bad input,
and end-to-end runs (the command contract, exact resume, two CPU processes, streaming, Hub push)."""

import json
import math
import unicodedata

import pytest
import torch
from accelerate.commands.config.config_args import load_config_from_file
from conftest import MULTI_SCRIPT_SAMPLE, REPO_ROOT
from datasets import Dataset
from transformers import AttentionInterface, AutoConfig, AutoModelForCausalLM, AutoTokenizer, Qwen2Config
from transformers.models.qwen2 import modeling_qwen2

import run_pretrain
from run_pretrain import (
    DataArguments,
    InputError,
    ModelArguments,
    PackedBlockCollator,
    build_config,
    filter_and_tokenize,
    pack_documents,
    prepare_dataset,
    train_tokenizer,
)
from study_common import document_start_id
from train_common import check_document_isolation, isolation_failure

# --------------------------------------------------------------------------------------
# Filtering and tokenizing documents, with every drop counted
# --------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tokenizer():
    return train_tokenizer(MULTI_SCRIPT_SAMPLE * 4, 400, show_progress=False)


def test_char_filter_drops_documents_left_empty_and_accounts_for_every_character(tokenizer):
    texts = ["Seoul (서울) is big.", "서울 。", "   ", "Plain text."]
    out = filter_and_tokenize({"text": texts}, tokenizer, 0, "text", "latin", "chars")
    assert out["drop_reason"] == ["", "empty_after_filter", "empty_input", ""]
    assert out["n_chars_removed"] == [2, 0, 0, 0]
    assert out["n_chars_out"] == [len("Seoul () is big."), 0, 0, len("Plain text.")]
    assert sum(out["n_chars_in"]) == sum(map(len, texts))
    assert out["input_ids"][0][0] == 0 and out["input_ids"][1] == [] and out["input_ids"][2] == []
    assert out["input_ids"][3] == [0, *tokenizer("Plain text.", add_special_tokens=False)["input_ids"]]


def test_documents_mode_drops_any_document_with_a_non_latin_letter(tokenizer):
    texts = ["Seoul (서울) is big.", "Café, 1234!", "Tibetan digit ༣"]
    out = filter_and_tokenize({"text": texts}, tokenizer, 0, "text", "latin", "documents")
    assert out["drop_reason"] == ["non_latin_letter", "", "non_latin_letter"]
    assert out["n_chars_out"][1] == len("Café, 1234!")


def test_no_script_filter_keeps_every_non_empty_document(tokenizer):
    out = filter_and_tokenize({"text": ["서울", ""]}, tokenizer, 0, "text", "none", "chars")
    assert out["drop_reason"] == ["", "empty_input"]
    assert tokenizer.decode(out["input_ids"][0][1:]) == "서울"


def test_the_counts_account_for_every_document_character_and_token(tokenizer):
    texts = ["Seoul (서울) is big.", "서울 。", "   ", "Plain text, a little longer than the others."] * 3
    blocks, stats = prepare_dataset(Dataset.from_dict({"text": texts}), tokenizer, 0, DataArguments(block_size=8))
    assert (stats["documents_in"], stats["documents_out"]) == (12, 6)
    assert stats["documents_dropped"] == {"empty_input": 3, "empty_after_filter": 3, "non_latin_letter": 0}
    assert stats["characters_in"] == sum(map(len, texts)) and stats["characters_removed_by_filter"] == 3 * 2
    assert stats["characters_out"] == 3 * (len("Seoul () is big.") + len(texts[3]))
    assert stats["characters_in_dropped_documents"] == 3 * (len("서울 。") + len("   "))
    tokens = sum(
        len(ids) for ids in filter_and_tokenize({"text": texts}, tokenizer, 0, "text", "latin", "chars")["input_ids"]
    )
    assert stats["tokens"] == tokens and stats["blocks"] == len(blocks) == tokens // 8
    assert stats["tokens_dropped_at_batch_tails"] == tokens % 8 == tokens - stats["tokens_in_blocks"]


def test_a_stream_is_filtered_and_packed_as_the_same_corpus_read_whole(tokenizer):
    texts = ["Seoul (서울) is big.", "Café, 1234!", "   ", "Plain text, a little longer than the others."] * 5
    args = DataArguments(block_size=8, filter_mode="documents", shuffle_buffer_size=1)
    whole, _ = prepare_dataset(Dataset.from_dict({"text": texts}), tokenizer, 0, args)
    streamed, counts = prepare_dataset(Dataset.from_dict({"text": texts}).to_iterable_dataset(), tokenizer, 0, args)
    rows = [(list(b["input_ids"]), list(b["position_ids"])) for b in streamed]
    assert counts is None and rows == list(zip(whole["input_ids"], whole["position_ids"])) and len(rows) > 2
    assert "서" not in tokenizer.decode(sum((ids for ids, _ in rows), []))  # the documents holding Hangul dropped


# --------------------------------------------------------------------------------------
# Packing and document-isolated attention
# --------------------------------------------------------------------------------------


def test_packing_restarts_positions_at_documents_and_windows_and_masks_document_starts():
    docs = [[0, 5, 6], [0, 7], [0, 8, 9, 10, 11]]
    blocks = pack_documents({"input_ids": docs}, block_size=4)
    assert [list(b) for b in blocks["input_ids"]] == [[0, 5, 6, 0], [7, 0, 8, 9]]  # tail (10, 11) dropped
    assert [list(p) for p in blocks["position_ids"]] == [[0, 1, 2, 0], [0, 0, 1, 2]]
    batch = PackedBlockCollator(document_attention=True)(
        [{"input_ids": i, "position_ids": p} for i, p in zip(blocks["input_ids"], blocks["position_ids"])]
    )
    assert batch["labels"].tolist() == [[-100, 5, 6, -100], [-100, -100, 8, 9]]
    assert "attention_mask" not in batch and batch["position_ids"].tolist() == [[0, 1, 2, 0], [0, 0, 1, 2]]
    assert "position_ids" not in PackedBlockCollator(document_attention=False)(
        [{"input_ids": [1], "position_ids": [0]}]
    )


@pytest.mark.parametrize("attn_implementation", ["sdpa", "eager"])
def test_a_document_packed_after_another_has_the_logits_it_has_alone(tiny_model_dir, attn_implementation):
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, attn_implementation=attn_implementation).eval()
    assert model.config.use_cache is False  # as run_pretrain sets it: a KV cache disables the packed mask
    start = document_start_id(tokenizer)
    doc_a, doc_b = ([start, *ids] for ids in tokenizer(MULTI_SCRIPT_SAMPLE[:2], add_special_tokens=False)["input_ids"])
    # two windows through the training path: [A B] and [B A]
    blocks = pack_documents({"input_ids": [doc_a, doc_b, doc_b, doc_a]}, block_size=len(doc_a) + len(doc_b))
    examples = [{"input_ids": i, "position_ids": p} for i, p in zip(blocks["input_ids"], blocks["position_ids"])]

    def logits(collator, examples):
        batch = collator(examples)
        batch.pop("labels")
        with torch.no_grad():
            return model(**batch).logits  # as the Trainer calls it

    isolated = logits(PackedBlockCollator(document_attention=True), examples)
    alone_a = logits(PackedBlockCollator(), [{"input_ids": doc_a, "position_ids": list(range(len(doc_a)))}])[0]
    alone_b = logits(PackedBlockCollator(), [{"input_ids": doc_b, "position_ids": list(range(len(doc_b)))}])[0]
    a, b = len(doc_a), len(doc_b)
    assert (isolated[0, a:] - alone_b).abs().max() < 1e-5
    assert (isolated[1, b:] - alone_a).abs().max() < 1e-5
    assert (isolated[0, :a] - alone_a).abs().max() < 1e-5
    # Without restarting positions (--no_document_attention) B attends to A: the check can fail.
    crossed = logits(PackedBlockCollator(document_attention=False), examples)
    assert (crossed[0, a:] - alone_b).abs().max() > 1e-3


def causal_across_documents(module, query, key, value, attention_mask, **kwargs):
    """An attention kernel that ignores document boundaries (as flash kernels do with B rows and no
    sequence boundaries): plain causal attention over the whole row."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    return sdpa_attention_forward(module, query, key, value, None, scaling=kwargs.get("scaling"), is_causal=True)


AttentionInterface.register("causal_across_documents", causal_across_documents)


def needs_a_gpu(module, query, key, value, attention_mask, **kwargs):
    raise RuntimeError("this kernel runs on CUDA devices only")


AttentionInterface.register("needs_a_gpu", needs_a_gpu)


def varlen_reference(module, query, key, value, attention_mask, cu_seq_lens_q=None, max_length_q=None, **kwargs):
    """A CPU stand-in for a flash varlen kernel: causal attention inside each sequence of
    ``cu_seq_lens_q`` only, as flash_attn_varlen_func computes it; it reads nothing else."""
    import torch.nn.functional as F

    total = query.shape[0] * query.shape[2]
    bounds = cu_seq_lens_q.tolist()
    longest = max(b - a for a, b in zip(bounds, bounds[1:])) if len(bounds) > 1 else 0
    if query.shape[0] != 1 or bounds[0] != 0 or bounds[-1] != total or longest != max_length_q:
        raise ValueError(f"sequence boundaries {bounds} (max {max_length_q}) do not cover the {total} tokens")
    pieces = [
        F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
        for q, k, v in ((query[:, :, a:b], key[:, :, a:b], value[:, :, a:b]) for a, b in zip(bounds, bounds[1:]))
    ]
    return torch.cat(pieces, dim=2).transpose(1, 2).contiguous(), None


AttentionInterface.register("varlen_reference", varlen_reference)


@pytest.mark.parametrize("flatten", [None, True])
def test_the_run_checks_document_isolation_on_its_own_model_and_batch_layout(tiny_model_dir, flatten):
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    windows = run_pretrain.isolation_check_windows(0, len(tokenizer))
    result = check_document_isolation(model, PackedBlockCollator(flatten=flatten), windows)
    assert result["layout"] == ("flattened" if flatten else "padded") and result["windows_in_batch"] >= 2
    assert result["device"] == "cpu" and result["compute_dtype"] == "float32"
    assert result["max_logit_diff_packed_vs_alone"] < 1e-5 and result["max_logit_diff_other_documents_changed"] < 1e-6
    assert isolation_failure(result) is None and result["holds"]
    windows = run_pretrain.isolation_check_windows(0, 300)
    leaky = check_document_isolation(model, PackedBlockCollator(document_attention=False), windows)
    assert leaky["max_logit_diff_other_documents_changed"] > 1e-3 and isolation_failure(leaky)


def test_in_16_bit_the_isolation_check_tells_rounding_from_attention_across_documents(tiny_model_dir):
    # In bf16 a document alone rounds differently (other matrix shapes) from the same document packed:
    # that is no leak. The same batch with the other documents changed is exact, unless attention leaks.
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    windows = run_pretrain.isolation_check_windows(0, len(tokenizer))
    bf16 = check_document_isolation(model, PackedBlockCollator(), windows, autocast_dtype=torch.bfloat16)
    assert bf16["compute_dtype"] == "bfloat16" and bf16["max_logit_diff_packed_vs_alone"] > 1e-4
    assert bf16["max_logit_diff_other_documents_changed"] == 0 and isolation_failure(bf16) is None
    model.config._attn_implementation = "causal_across_documents"
    leaky = check_document_isolation(
        model,
        PackedBlockCollator(attn_implementation="causal_across_documents"),
        run_pretrain.isolation_check_windows(0, 300),
        autocast_dtype=torch.bfloat16,
    )
    assert "when the other documents of its micro-batch change" in isolation_failure(leaky)


# --------------------------------------------------------------------------------------
# Tokenizer
# --------------------------------------------------------------------------------------


def test_trained_tokenizer_reloads_through_autotokenizer_with_identical_ids(tokenizer, tmp_path):
    # A folder with a qwen2 config.json makes AutoTokenizer load Qwen2Tokenizer, which rebuilds the
    # pre-tokenizer: the trained tokenizer must tokenize exactly as the reloaded one.
    tokenizer.save_pretrained(tmp_path)
    Qwen2Config(vocab_size=len(tokenizer)).save_pretrained(tmp_path)
    reloaded = AutoTokenizer.from_pretrained(tmp_path)
    for text in [*MULTI_SCRIPT_SAMPLE, "e\u0301 cafe\u0301 Ω x²  \n\n tabs\tand 12345"]:
        assert (
            reloaded(text, add_special_tokens=False)["input_ids"]
            == tokenizer(text, add_special_tokens=False)["input_ids"]
        )
    assert (reloaded.eos_token, reloaded.pad_token) == ("<|endoftext|>", "<|pad|>")
    assert (reloaded.eos_token_id, reloaded.pad_token_id) == (0, 1)


def test_trained_tokenizer_encodes_every_script_without_loss(tokenizer):
    for text in MULTI_SCRIPT_SAMPLE:
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        assert tokenizer.decode(ids) == unicodedata.normalize("NFC", text)


def test_tokenizer_trains_on_files_and_rejects_a_vocabulary_below_the_byte_alphabet(tmp_path):
    corpus = tmp_path / "tok.jsonl"
    corpus.write_text("".join(json.dumps({"body": t}) + "\n" for t in MULTI_SCRIPT_SAMPLE), encoding="utf-8")
    trained = train_tokenizer([corpus], 300, text_column="body", show_progress=False)
    assert len(trained) == 300
    with pytest.raises(InputError, match="--vocab_size 100 is too small"):
        train_tokenizer(["x"], 100)


# --------------------------------------------------------------------------------------
# Config
# --------------------------------------------------------------------------------------


def test_config_takes_overrides_typed_as_their_fields_and_the_tokenizer_vocabulary_and_disables_the_cache(tokenizer):
    args = ModelArguments(config_name="configs/tiny.json", config_overrides="num_hidden_layers=3, hidden_act=gelu")
    config, overrides = build_config(args, tokenizer, block_size=128)
    assert (config.num_hidden_layers, config.hidden_act) == (3, "gelu")
    assert overrides == {"num_hidden_layers": 3, "hidden_act": "gelu"}  # as recorded in data_stats.json
    assert len(config.layer_types) == 3  # derived from the overridden depth, not left at the file's
    assert config.vocab_size == len(tokenizer) and config.use_cache is False
    assert (config.eos_token_id, config.pad_token_id) == (0, 1)
    args.config_overrides = "vocab_size=151936"
    assert build_config(args, tokenizer, block_size=128)[0].vocab_size == 151936
    args.config_overrides = "vocab_size=300"
    with pytest.raises(InputError, match="smaller than the tokenizer"):
        build_config(args, tokenizer, block_size=128)


@pytest.mark.parametrize(
    "overrides, message",
    [
        ("no_such_field=3", r"'no_such_field=3': key no_such_field isn't in the original config dict"),
        ("num_hidden_layers=1,hidden_size:64", r"'num_hidden_layers=1,hidden_size:64': .*Write key=value pairs"),
        ("num_hidden_layers=two", r"'num_hidden_layers=two': invalid literal for int"),
    ],
)
def test_a_bad_config_override_is_named_with_the_fix(tokenizer, overrides, message):
    args = ModelArguments(config_name="configs/tiny.json", config_overrides=overrides)
    with pytest.raises(InputError, match=rf"--config_overrides {message}"):
        build_config(args, tokenizer, block_size=128)


# --------------------------------------------------------------------------------------
# Bad input: clear errors naming the file or item and what to do (run in-process)
# --------------------------------------------------------------------------------------


def main_args(tmp_path, train_file, tokenizer_dir, *extra):
    return [
        "--tokenizer_name", str(tokenizer_dir), "--train_file", str(train_file), "--config_name", "configs/tiny.json",
        "--block_size", "16", "--output_dir", str(tmp_path / "out"), "--max_steps", "1", "--report_to", "none",
        "--cache_dir", str(tmp_path / "cache"), *extra,
    ]  # fmt: skip


@pytest.fixture
def english_file(tmp_path):
    path = tmp_path / "english.txt"
    path.write_text("The river runs past the old mill.\nA second line of text.\n" * 5, encoding="utf-8")
    return path


@pytest.fixture(autouse=False)
def in_repo(monkeypatch):
    monkeypatch.chdir(REPO_ROOT)


def test_missing_training_file_is_named(tmp_path, tiny_model_dir, in_repo):
    with pytest.raises(InputError, match=r"--train_file: \S*nope\.txt: no such file"):
        run_pretrain.main(main_args(tmp_path, tmp_path / "nope.txt", tiny_model_dir))


def test_empty_training_file_is_named(tmp_path, tiny_model_dir, in_repo):
    empty = tmp_path / "empty.txt"
    empty.write_text("")
    with pytest.raises(InputError, match=r"--train_file: \S*empty\.txt: the file is empty\. Give a file"):
        run_pretrain.main(main_args(tmp_path, empty, tiny_model_dir))


def test_missing_text_column_names_the_file_line_and_the_option(tmp_path, tiny_model_dir, in_repo):
    data = tmp_path / "data.jsonl"
    data.write_text('{"body": "some text"}\n', encoding="utf-8")
    with pytest.raises(InputError, match=r"data\.jsonl:1: no 'text' column \(found: body\)\. Pass --text_column"):
        run_pretrain.main(main_args(tmp_path, data, tiny_model_dir))


@pytest.mark.parametrize("streaming", [False, True])
def test_a_training_file_that_is_not_utf8_is_named_by_file_and_line(tmp_path, tiny_model_dir, in_repo, streaming):
    latin1 = tmp_path / "latin1.txt"
    latin1.write_bytes(b"The river runs past the old mill.\n" * 2 + b"A caf\xe9 by the river.\n")
    extra = ["--streaming", "--max_steps", "2"] if streaming else []
    with pytest.raises(InputError, match=r"latin1\.txt:3: not UTF-8 \(byte 0xe9: .*Re-encode it as UTF-8"):
        run_pretrain.main(main_args(tmp_path, latin1, tiny_model_dir, *extra))
    assert not (tmp_path / "out").exists()  # nothing written


def test_a_corpus_shorter_than_one_window_is_refused(tmp_path, tiny_model_dir, in_repo):
    short = tmp_path / "short.txt"
    short.write_text("A river.\n", encoding="utf-8")
    with pytest.raises(InputError, match=r"short\.txt: \d+ tokens after filtering, fewer than one window of --block_"):
        run_pretrain.main(main_args(tmp_path, short, tiny_model_dir))
    assert not (tmp_path / "out").exists()


def test_train_tokenizer_needs_the_files_of_every_language(tmp_path, english_file, in_repo):
    args = [*main_args(tmp_path, english_file, "unused"), "--train_tokenizer", "--vocab_size", "300"]
    args[args.index("--tokenizer_name") : args.index("--tokenizer_name") + 2] = []
    with pytest.raises(InputError, match=r"--train_tokenizer needs --tokenizer_files FILE"):
        run_pretrain.main(args)
    assert not (tmp_path / "out").exists()


def test_unknown_config_name_lists_the_available_configs(tmp_path, tiny_model_dir, english_file, in_repo):
    with pytest.raises(InputError, match=r"configs/nope\.json: no such config file\. Available: .*configs/tiny\.json"):
        run_pretrain.main(main_args(tmp_path, english_file, tiny_model_dir, "--config_name", "configs/nope.json"))


def test_block_size_above_max_positions_says_the_limit(tmp_path, tiny_model_dir, english_file, in_repo):
    with pytest.raises(InputError, match=r"--block_size 4096 is above .*\(2048, from configs/tiny\.json\)"):
        run_pretrain.main(main_args(tmp_path, english_file, tiny_model_dir, "--block_size", "4096"))


def test_tokenizer_without_eos_is_refused_with_the_fix(tmp_path, english_file, tokenizer, in_repo):
    no_eos = tmp_path / "no_eos_tokenizer"
    tokenizer.save_pretrained(no_eos)
    config_file = no_eos / "tokenizer_config.json"
    config = json.loads(config_file.read_text())
    config.update(eos_token=None, pad_token=None)
    config_file.write_text(json.dumps(config))
    with pytest.raises(InputError, match=r"no_eos_tokenizer.* has no EOS token.*Set eos_token"):
        run_pretrain.main(main_args(tmp_path, english_file, no_eos))


def test_corpus_with_every_document_filtered_away_is_refused(tmp_path, tiny_model_dir, in_repo):
    korean = tmp_path / "korean.txt"
    korean.write_text("한국 사람들은 가을에 추석을 지낸다.\n송편을 먹는다。\n", encoding="utf-8")
    with pytest.raises(InputError, match=r"korean\.txt: every document was filtered away \(2 read"):
        run_pretrain.main(main_args(tmp_path, korean, tiny_model_dir))
    assert not (tmp_path / "out" / "data_stats.json").exists()


@pytest.mark.parametrize(
    "name, content, extra, message",
    [
        (
            "korean.txt",
            "한국 사람들은 가을에 추석을 지낸다.\n송편을 먹는다.\n",
            [],
            r"korean\.txt: every document was filtered",
        ),
        ("broken.jsonl", '{"text": "fine"}\n{"text": "fine"}\n{"text": oops\n', [], r"broken\.jsonl:3: not valid JSON"),
        ("data.md", "A river.\n", [], r"data\.md: unknown file type '\.md'; accepted: \.txt"),
        (
            "english.txt",
            "The river runs past the old mill.\n" * 5,
            ["--block_size", "4096"],
            r"--block_size 4096 is above",
        ),
    ],
)
def test_train_tokenizer_with_bad_data_or_config_leaves_nothing_in_output_dir(
    tmp_path, in_repo, name, content, extra, message
):
    tokenizer_file = tmp_path / "tokenizer.txt"
    tokenizer_file.write_text("\n".join(MULTI_SCRIPT_SAMPLE * 3) + "\n", encoding="utf-8")
    train_file = tmp_path / name
    train_file.write_text(content, encoding="utf-8")
    args = main_args(tmp_path, train_file, "unused")
    args[args.index("--tokenizer_name") : args.index("--tokenizer_name") + 2] = [
        "--train_tokenizer", "--vocab_size", "300", "--tokenizer_files", str(tokenizer_file),
    ]  # fmt: skip
    with pytest.raises(InputError, match=message):
        run_pretrain.main(args + extra)
    left = {p.name for p in tmp_path.iterdir()} - {"cache"}
    assert left == {"tokenizer.txt", name}  # no --output_dir, and no tokenizer staging folder beside it


@pytest.mark.parametrize(
    "name, content, message",
    [
        ("tok.jsonl", '{"text": "fine"}\n{oops\n', r"tok\.jsonl:2: not valid JSON"),
        ("tok.md", "A river.\n", r"--tokenizer_files: .*tok\.md: unknown file type '\.md'; accepted: \.txt"),
    ],
)
def test_a_bad_tokenizer_file_is_an_input_error_and_leaves_nothing(
    tmp_path, english_file, in_repo, name, content, message
):
    tokenizer_file = tmp_path / name
    tokenizer_file.write_text(content, encoding="utf-8")
    args = main_args(tmp_path, english_file, "unused")
    args[args.index("--tokenizer_name") : args.index("--tokenizer_name") + 2] = [
        "--train_tokenizer", "--vocab_size", "300", "--tokenizer_files", str(tokenizer_file),
    ]  # fmt: skip
    with pytest.raises(InputError, match=message):
        run_pretrain.main(args)
    assert not (tmp_path / "out").exists() and not (tmp_path / ".out.tokenizer-tmp").exists()


@pytest.mark.parametrize(
    ("attn_implementation", "why"),
    [("flex_attention", "has no backward on CPU"), ("flash_attention_2", "needs a GPU"),
     ("kernels-community/flash-attn", "needs a GPU")],
)  # fmt: skip
def test_a_kernel_that_does_not_train_on_cpu_is_refused_before_anything_is_written(
    tmp_path, english_file, attn_implementation, why, in_repo
):
    args = ["--train_tokenizer", "--vocab_size", "300", "--tokenizer_files", str(english_file)]
    with pytest.raises(
        InputError, match=rf"--attn_implementation {attn_implementation} does not train on the CPU.*{why}"
    ):
        run_pretrain.main(
            [*main_args(tmp_path, english_file, "unused"), *args, "--attn_implementation", attn_implementation]
        )
    assert sorted(p.name for p in tmp_path.iterdir()) == ["english.txt"]  # no output, no tokenizer, no cache


def test_a_run_whose_attention_crosses_documents_stops_before_training(tmp_path, tiny_model_dir, english_file, in_repo):
    args = main_args(tmp_path, english_file, tiny_model_dir, "--attn_implementation", "causal_across_documents")
    with pytest.raises(
        InputError,
        match=r"causal_across_documents \(flattened layout\) on cpu a document's logits change.*crosses documents",
    ):
        run_pretrain.main(args)
    assert not (tmp_path / "out").exists()  # nothing trained, nothing written


def test_a_kernel_that_cannot_run_on_the_training_device_is_an_error_naming_both(
    tmp_path, tiny_model_dir, english_file, in_repo
):
    args = main_args(tmp_path, english_file, tiny_model_dir, "--attn_implementation", "needs_a_gpu")
    with pytest.raises(
        InputError, match=r"--attn_implementation needs_a_gpu cannot run on cpu \(RuntimeError: this kernel"
    ):
        run_pretrain.main(args)
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("streaming", [False, True])
@pytest.mark.parametrize("attn_implementation", ["sdpa", "varlen_reference"])
def test_the_flattened_layout_trains_through_the_trainer_and_records_its_check(
    tmp_path, tiny_model_dir, english_file, in_repo, streaming, attn_implementation
):
    # varlen_reference reads only cu_seq_lens_q/max_length_q, as flash kernels do: it trains only if the
    # boundaries reach the model whole (a streamed batch dispatched by accelerate has them cut).
    extra = ["--attn_implementation", attn_implementation, "--batch_layout", "flattened"]
    extra += ["--per_device_train_batch_size", "3", "--max_steps", "2", "--save_strategy", "no"]
    extra += ["--streaming", "--shuffle_buffer_size", "1"] if streaming else []
    run_pretrain.main(main_args(tmp_path, english_file, tiny_model_dir, *extra))
    stats = json.loads((tmp_path / "out" / "data_stats.json").read_text())
    check = stats["document_attention"]
    assert check["layout"] == "flattened" and check["attn_implementation"] == attn_implementation
    assert check["device"] == "cpu"
    assert check["max_logit_diff_other_documents_changed"] < 1e-6 and check["max_logit_diff_packed_vs_alone"] < 1e-5
    state = json.loads((tmp_path / "out" / "trainer_state.json").read_text())
    assert state["global_step"] == 2 and all(math.isfinite(e["loss"]) for e in state["log_history"] if "loss" in e)


def test_existing_checkpoints_are_not_overwritten_silently(tmp_path, tiny_model_dir, english_file, in_repo):
    (tmp_path / "out" / "checkpoint-5").mkdir(parents=True)
    with pytest.raises(InputError, match=r"already holds .*checkpoint-5\. Pass --resume_from_checkpoint"):
        run_pretrain.main(main_args(tmp_path, english_file, tiny_model_dir))


def test_without_output_dir_the_base_model_goes_where_the_next_steps_look_for_it(tmp_path, monkeypatch):
    import run_pretrain
    from study_common import DEFAULT_BASE_MODEL_DIR

    monkeypatch.chdir(tmp_path)
    given = run_pretrain.parse_arguments(["--train_file", "corpus.txt"])[2]
    assert given.output_dir == str(DEFAULT_BASE_MODEL_DIR) == "runs/pretrain"
    explicit = run_pretrain.parse_arguments(["--train_file", "corpus.txt", "--output_dir", "elsewhere"])[2]
    assert explicit.output_dir == "elsewhere"


# --------------------------------------------------------------------------------------
# configs/ (model architectures) and accelerate_configs/ (launch configs) say what they claim
# --------------------------------------------------------------------------------------


def parameters(config) -> int:
    with torch.device("meta"):
        return sum(p.numel() for p in AutoModelForCausalLM.from_config(config).parameters())


def test_qwen_config_has_the_qwen2_5_0_5b_shapes():
    config = AutoConfig.from_pretrained(REPO_ROOT / "configs" / "qwen2.5-0.5b.json")
    assert config.model_type == "qwen2"
    assert (config.num_hidden_layers, config.hidden_size, config.num_attention_heads) == (24, 896, 14)
    assert (config.num_key_value_heads, config.intermediate_size, config.vocab_size) == (2, 4864, 151936)
    assert config.tie_word_embeddings is True and config.rope_parameters["rope_theta"] == 1_000_000.0
    assert parameters(config) == 494_032_768  # Qwen2.5-0.5B's published count (0.49B)


def test_tiny_config_is_a_cpu_sized_qwen2():
    config = AutoConfig.from_pretrained(REPO_ROOT / "configs" / "tiny.json")
    assert config.model_type == "qwen2" and config.tie_word_embeddings is True
    assert config.max_position_embeddings >= 512 and config.use_cache is False
    assert parameters(config) < 3_000_000


def test_cpu_config_starts_two_processes_without_mpi():
    config = load_config_from_file(str(REPO_ROOT / "accelerate_configs" / "cpu.yaml"))
    # MULTI_CPU would need mpirun and silently start one process; MULTI_GPU + use_cpu starts two.
    assert str(config.distributed_type) == "DistributedType.MULTI_GPU" and config.use_cpu is True
    assert config.num_processes == 2


@pytest.mark.parametrize("name", ["fsdp", "fsdp_multinode"])
def test_fsdp_configs_fully_shard_each_decoder_layer_in_bf16(name):
    config = load_config_from_file(str(REPO_ROOT / "accelerate_configs" / f"{name}.yaml"))
    fsdp = config.fsdp_config
    assert str(config.distributed_type) == "DistributedType.FSDP" and config.mixed_precision == "bf16"
    assert fsdp["fsdp_version"] == 2 and fsdp["fsdp_reshard_after_forward"] is True  # FULL_SHARD
    assert fsdp["fsdp_auto_wrap_policy"] == "TRANSFORMER_BASED_WRAP"
    assert hasattr(modeling_qwen2, fsdp["fsdp_transformer_layer_cls_to_wrap"])  # a real class name
    assert fsdp["fsdp_state_dict_type"] == "FULL_STATE_DICT"  # checkpoints from_pretrained can load


def test_gpu_configs_use_bf16_and_the_multinode_one_spans_machines():
    single = load_config_from_file(str(REPO_ROOT / "accelerate_configs" / "single_gpu.yaml"))
    assert str(single.distributed_type) == "DistributedType.NO" and single.mixed_precision == "bf16"
    multi = load_config_from_file(str(REPO_ROOT / "accelerate_configs" / "multi_gpu.yaml"))
    assert str(multi.distributed_type) == "DistributedType.MULTI_GPU" and multi.mixed_precision == "bf16"
    nodes = load_config_from_file(str(REPO_ROOT / "accelerate_configs" / "fsdp_multinode.yaml"))
    assert nodes.num_machines == 2 and nodes.num_processes == 16


def test_a_training_file_changed_in_place_is_read_again_not_taken_from_the_cache(tmp_path):
    corpus = tmp_path / "corpus.txt"
    args = run_pretrain.DataArguments(train_file=str(corpus), cache_dir=str(tmp_path / "cache"))
    corpus.write_text("The first corpus.\n", encoding="utf-8")
    assert run_pretrain.read_train_documents(args, streaming=False)["text"] == ["The first corpus."]
    corpus.write_text("The second corpus, longer.\nTwo documents.\n", encoding="utf-8")
    assert run_pretrain.read_train_documents(args, streaming=False)["text"] == [
        "The second corpus, longer.",
        "Two documents.",
    ]
