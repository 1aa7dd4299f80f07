"""run_pretrain.py: Latin filter, tokenizer, packing with document-isolated attention, bad input,
and end-to-end runs (the command contract, exact resume, two CPU processes, streaming, Hub push)."""

import json
import math
import random
import shutil
import sys
import unicodedata
from pathlib import Path

import pytest
import regex
import torch
from conftest import MULTI_SCRIPT_SAMPLE, REPO_ROOT, run_script
from transformers import AttentionInterface, AutoModelForCausalLM, AutoTokenizer, Qwen2Config

import run_pretrain
from run_pretrain import (
    InputError,
    ModelArguments,
    PackedBlockCollator,
    build_config,
    filter_and_tokenize,
    pack_documents,
    parse_config_overrides,
    train_tokenizer,
)
from study_common import document_start_id, encode_documents, filter_to_latin, has_non_latin_letter
from train_common import check_document_isolation, isolation_failure

# --------------------------------------------------------------------------------------
# The Latin filter: the fast implementation against the rule written as a loop
# --------------------------------------------------------------------------------------

_LATIN_OR_COMMON = regex.compile(r"[\p{scx=Latin}\p{scx=Zyyy}]")
_MARK = regex.compile(r"\p{M}")
_LETTER = regex.compile(r"\p{L}")


def latin_filter_rule(text: str) -> tuple[str, int]:
    """The filter's definition, one character at a time: a combining mark is kept iff the last
    non-mark character before it is a kept letter; any other character iff it is Latin or Common."""
    kept, removed, after_kept_letter = [], 0, False
    for char in text:
        if _MARK.match(char):
            keep = after_kept_letter
        else:
            keep = bool(_LATIN_OR_COMMON.match(char))
            after_kept_letter = keep and bool(_LETTER.match(char))
        if keep:
            kept.append(char)
        else:
            removed += 1
    return "".join(kept), removed


@pytest.fixture(scope="module")
def assigned():
    """Every assigned code point except surrogates and private use (~160k characters)."""
    every = "".join(map(chr, range(0x110000)))
    return regex.findall(r"[^\p{Cn}\p{Cs}\p{Co}]", every)


def test_latin_filter_matches_its_character_rule_on_every_assigned_code_point(assigned):
    # every code point after a Latin letter, after a digit, doubled with a Latin-script mark,
    # and followed by an acute accent: bases, marks in every context, leading marks
    text = "".join(f"a{c}\u0301 1{c}{c}\u0363 {c}" for c in assigned)
    assert filter_to_latin(text) == latin_filter_rule(text)
    marks = [c for c in assigned if _MARK.match(c)]
    rng = random.Random(0)
    for _ in range(3000):
        pools = [assigned, marks, "aé1 .,\u0301"]
        sample = "".join(rng.choice(rng.choice(pools)) for _ in range(rng.randint(0, 12)))
        assert filter_to_latin(sample) == latin_filter_rule(sample), ascii(sample)


def test_latin_filter_keeps_accented_latin_and_removes_other_scripts_and_their_punctuation():
    assert filter_to_latin("Café naïve e\u0301 1234, «ok»!") == ("Café naïve e\u0301 1234, «ok»!", 0)
    assert filter_to_latin("Seoul (서울) 。end") == ("Seoul () end", 3)  # U+3002 is Han/Hangul punctuation
    assert filter_to_latin("བོད་ ༣ ᠮᠣ᠂x") == ("  x", 8)  # Tibetan letters, marks, digit; Mongolian comma
    assert filter_to_latin("\u0301a") == ("a", 1)  # a mark with no letter before it


def test_non_latin_letter_check_matches_its_rule_where_python_knows_the_character(assigned):
    def rule(c):
        return bool((_LETTER.match(c) or unicodedata.category(c) == "Nd") and not _LATIN_OR_COMMON.match(c))

    # Python's unicodedata is older than the regex module's tables: skip what it does not know.
    known = [c for c in assigned if unicodedata.category(c) != "Cn"]
    assert [c for c in known if has_non_latin_letter(c) != rule(c)] == []
    assert has_non_latin_letter("Paris ༣") and not has_non_latin_letter("Café 123 — «ok» \u0301")


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
    doc_a, doc_b = ([start, *ids] for ids in encode_documents(tokenizer, MULTI_SCRIPT_SAMPLE[:2]))
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


def test_config_overrides_parse_values_and_name_a_bad_item():
    assert parse_config_overrides("a=1, b=0.5,c=true,d=null,e=silu") == {
        "a": 1,
        "b": 0.5,
        "c": True,
        "d": None,
        "e": "silu",
    }
    with pytest.raises(InputError, match="'hidden_size:64' is not key=value"):
        parse_config_overrides("num_hidden_layers=1,hidden_size:64")


def test_config_takes_overrides_and_the_tokenizer_vocabulary_and_disables_the_cache(tokenizer):
    args = ModelArguments(config_name="configs/tiny.json", config_overrides="num_hidden_layers=1,rope_theta=10000")
    config, overrides = build_config(args, tokenizer, block_size=128)
    assert config.num_hidden_layers == 1 and config.rope_parameters["rope_theta"] == 10000.0
    assert config.vocab_size == len(tokenizer) and config.use_cache is False
    assert (config.eos_token_id, config.pad_token_id) == (0, 1)
    args.config_overrides = "vocab_size=151936"
    assert build_config(args, tokenizer, block_size=128)[0].vocab_size == 151936
    args.config_overrides = "vocab_size=300"
    with pytest.raises(InputError, match="smaller than the tokenizer"):
        build_config(args, tokenizer, block_size=128)
    args.config_overrides = "no_such_field=3"
    with pytest.raises(InputError, match="'no_such_field' is not a field"):
        build_config(args, tokenizer, block_size=128)


def test_every_option_has_help():
    import dataclasses

    for cls in (run_pretrain.ModelArguments, run_pretrain.DataArguments):
        missing = [f.name for f in dataclasses.fields(cls) if not f.metadata.get("help")]
        assert missing == [], f"{cls.__name__}: {missing}"


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
    with pytest.raises(InputError, match=r"nope\.txt: no such --train_file\. Check the path"):
        run_pretrain.main(main_args(tmp_path, tmp_path / "nope.txt", tiny_model_dir))


def test_empty_training_file_is_named(tmp_path, tiny_model_dir, in_repo):
    empty = tmp_path / "empty.txt"
    empty.write_text("")
    with pytest.raises(InputError, match=r"empty\.txt: the --train_file is empty\. Give a file"):
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
    config.pop("eos_token"), config.pop("pad_token")
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
    if not streaming:  # windows of 16 tokens: a token attends to fewer keys than in one causal window
        assert 1 <= stats["attended_keys_per_token"] < (16 + 1) / 2


def test_existing_checkpoints_are_not_overwritten_silently(tmp_path, tiny_model_dir, english_file, in_repo):
    (tmp_path / "out" / "checkpoint-5").mkdir(parents=True)
    with pytest.raises(InputError, match=r"already holds .*checkpoint-5\. Pass --resume_from_checkpoint"):
        run_pretrain.main(main_args(tmp_path, english_file, tiny_model_dir))


# --------------------------------------------------------------------------------------
# End to end (subprocesses, as a user runs them)
# --------------------------------------------------------------------------------------

ENGLISH_WORDS = (
    "the of and to in is was for on that with as by at from his her their city river king war people music "
    "school language culture festival food family history café naïve village harvest autumn winter bridge"
).split()


@pytest.fixture(scope="module")
def corpus_dir(tmp_path_factory):
    """A small English corpus (with some Korean to filter out) and tokenizer files in two scripts."""
    folder = tmp_path_factory.mktemp("pretrain_corpus")
    rng = random.Random(0)
    lines = []
    for i in range(300):
        line = " ".join(rng.choice(ENGLISH_WORDS) for _ in range(rng.randint(5, 40))).capitalize() + "."
        if i % 7 == 0:
            line += " (서울)"
        lines.append("한국 사람들은 가을에." if i % 50 == 0 else line)
    (folder / "corpus.txt").write_text("\n".join(lines) + "\n", encoding="utf-8")
    (folder / "A.txt").write_text("\n".join(lines[:150]) + "\n", encoding="utf-8")
    (folder / "B.txt").write_text("\n".join(MULTI_SCRIPT_SAMPLE * 10) + "\n", encoding="utf-8")
    return folder


def contract_command(corpus_dir: Path, output_dir: Path) -> list[str]:
    return [
        sys.executable, "run_pretrain.py", "--config_name", "configs/tiny.json", "--train_tokenizer",
        "--vocab_size", "2000", "--tokenizer_files", str(corpus_dir / "A.txt"), str(corpus_dir / "B.txt"),
        "--train_file", str(corpus_dir / "corpus.txt"), "--block_size", "128", "--output_dir", str(output_dir),
        "--max_steps", "20", "--save_steps", "10", "--per_device_train_batch_size", "4", "--logging_steps", "1",
        "--seed", "0",
    ]  # fmt: skip


def losses(output_dir: Path) -> dict[int, float]:
    state = json.loads((output_dir / "trainer_state.json").read_text())
    return {entry["step"]: entry["loss"] for entry in state["log_history"] if "loss" in entry}


@pytest.fixture(scope="module")
def contract_run(corpus_dir, tmp_path_factory):
    output_dir = tmp_path_factory.mktemp("contract") / "OUT"
    run_script(contract_command(corpus_dir, output_dir), env_extra={"HF_DATASETS_CACHE": str(output_dir.parent)})
    return output_dir


@pytest.mark.slow
def test_contract_command_leaves_a_loadable_model_tokenizer_stats_and_checkpoints(contract_run):
    model = AutoModelForCausalLM.from_pretrained(contract_run)
    tokenizer = AutoTokenizer.from_pretrained(contract_run)
    assert model.config.vocab_size == len(tokenizer) and tokenizer.eos_token == "<|endoftext|>"
    assert (contract_run / "checkpoint-10").is_dir() and (contract_run / "checkpoint-20").is_dir()
    stats = json.loads((contract_run / "data_stats.json").read_text())
    assert stats["documents_in"] == 300 and stats["documents_dropped"]["empty_after_filter"] == 6
    assert stats["characters_removed_by_filter"] > 0 and stats["documents_out"] == 294
    assert stats["characters_in"] == (
        stats["characters_out"] + stats["characters_removed_by_filter"] + stats["characters_in_dropped_documents"]
    )
    assert stats["tokens_in_blocks"] == stats["blocks"] * 128 <= stats["tokens"]
    assert stats["document_attention"]["max_logit_diff_packed_vs_alone"] < 1e-4
    assert stats["document_attention"]["max_logit_diff_other_documents_changed"] < 1e-6
    assert stats["document_attention"]["layout"] == "padded" and stats["document_attention"]["windows_in_batch"] == 2
    assert stats["world_size"] == 1 and stats["distributed_type"] == "NO" and len(losses(contract_run)) == 20
    card = (contract_run / "README.md").read_text()
    assert "| optimizer steps | 20 |" in card and f"| tokens seen | {20 * 4 * 128} |" in card
    assert "latin (chars)" in card and "configs/tiny.json" in card
    throughput = json.loads((contract_run / "throughput.json").read_text())
    assert throughput["tokens_per_step"] == 512 and throughput["steady_tokens_per_second"] > 0


@pytest.mark.slow
def test_resume_from_a_checkpoint_continues_with_identical_losses(contract_run, corpus_dir, tmp_path):
    # The run stops after its checkpoint at step 10 (a copy of the contract run's checkpoint-10
    # is all the new folder holds); resuming from it must reproduce steps 11-20 exactly.
    resumed = tmp_path / "OUT"
    shutil.copytree(contract_run / "checkpoint-10", resumed / "checkpoint-10")
    command = contract_command(corpus_dir, resumed) + ["--resume_from_checkpoint", str(resumed / "checkpoint-10")]
    run_script(command, env_extra={"HF_DATASETS_CACHE": str(tmp_path)})
    straight, continued = losses(contract_run), losses(resumed)
    assert sorted(continued) == list(range(1, 21))
    assert [continued[s] for s in range(11, 21)] == [straight[s] for s in range(11, 21)]


@pytest.mark.slow
def test_cpu_accelerate_config_trains_with_two_processes(corpus_dir, tmp_path):
    output_dir = tmp_path / "OUT"
    command = contract_command(corpus_dir, output_dir)[1:]
    command[command.index("--max_steps") + 1] = "4"
    command[command.index("--save_steps") + 1] = "4"
    accelerate = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", "accelerate_configs/cpu.yaml"]
    run_script(accelerate + command, env_extra={"HF_DATASETS_CACHE": str(tmp_path)})
    stats = json.loads((output_dir / "data_stats.json").read_text())
    assert stats["world_size"] == 2 and stats["distributed_type"] == "MULTI_CPU"
    assert stats["tokens_per_step"] == 4 * 2 * 128
    state = json.loads((output_dir / "trainer_state.json").read_text())
    assert state["global_step"] == 4
    # each of the 2 processes reads half of the windows, 4 per step: an epoch takes half the steps
    steps_per_epoch = math.ceil(math.ceil(stats["blocks"] / 2) / 4)
    assert state["log_history"][0]["epoch"] == pytest.approx(1 / steps_per_epoch)
    assert AutoModelForCausalLM.from_pretrained(output_dir).config.vocab_size > 0


@pytest.mark.slow
def test_streamed_dataset_trains_and_reports_what_it_read(corpus_dir, tiny_model_dir, tmp_path):
    dataset_dir = tmp_path / "dataset"
    dataset_dir.mkdir()
    lines = (corpus_dir / "corpus.txt").read_text(encoding="utf-8").splitlines()
    rows = [{"id": i, "content": line} for i, line in enumerate(lines)] + [{"id": -1, "content": "송편。"}]
    (dataset_dir / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    output_dir = tmp_path / "OUT"
    run_script(
        [
            sys.executable,
            "run_pretrain.py",
            "--dataset_name",
            str(dataset_dir),
            "--streaming",
            "--text_column",
            "content",
            "--tokenizer_name",
            str(tiny_model_dir),
            "--filter_mode",
            "documents",
            "--block_size",
            "64",
            "--output_dir",
            str(output_dir),
            "--max_steps",
            "3",
            "--save_steps",
            "3",
            "--per_device_train_batch_size",
            "2",
            "--logging_steps",
            "1",
            "--shuffle_buffer_size",
            "50",
        ],  # fmt: skip
        env_extra={"HF_DATASETS_CACHE": str(tmp_path)},
    )
    stats = json.loads((output_dir / "data_stats.json").read_text())
    assert stats["streaming"] is True and stats["documents_in"] > 0
    assert stats["documents_in"] == stats["documents_out"] + sum(stats["documents_dropped"].values())
    assert stats["documents_dropped"]["non_latin_letter"] > 0  # the lines with (서울) in documents mode
    assert len(losses(output_dir)) == 3 and (output_dir / "model.safetensors").is_file()


@pytest.mark.slow
def test_push_to_hub_uploads_the_model_and_a_card_with_the_setting(corpus_dir, tiny_model_dir, tmp_path, local_hub):
    output_dir = tmp_path / "OUT"
    run_script(
        [
            sys.executable,
            "run_pretrain.py",
            "--train_file",
            str(corpus_dir / "corpus.txt"),
            "--tokenizer_name",
            str(tiny_model_dir),
            "--block_size",
            "64",
            "--output_dir",
            str(output_dir),
            "--max_steps",
            "2",
            "--save_steps",
            "1",
            "--per_device_train_batch_size",
            "2",
            "--push_to_hub",
            "--hub_model_id",
            "study/latin-base",
            "--hub_strategy",
            "all_checkpoints",
        ],  # fmt: skip
        env_extra={"HF_DATASETS_CACHE": str(tmp_path)},
    )
    files = local_hub.files("study/latin-base", "models")
    assert {"README.md", "config.json", "model.safetensors", "tokenizer.json"} <= set(files)
    # every checkpoint of the learning curve, the last one too (the Trainer skips a push while one uploads)
    assert {"checkpoint-1/model.safetensors", "checkpoint-2/model.safetensors"} <= set(files)
    card = (local_hub.root / "models" / "study/latin-base" / "README.md").read_text()
    assert "| optimizer steps | 2 |" in card and f"| data | {corpus_dir / 'corpus.txt'} |" in card
    assert "| script filter | latin (chars) |" in card


@pytest.mark.slow
def test_command_line_errors_are_one_clear_line(tmp_path):
    import subprocess

    proc = subprocess.run(
        [sys.executable, "run_pretrain.py", "--train_file", str(tmp_path / "missing.txt"), "--train_tokenizer",
         "--output_dir", str(tmp_path / "out")],
        cwd=REPO_ROOT, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert proc.returncode == 2
    assert "run_pretrain.py: error: " in proc.stderr and "Traceback" not in proc.stderr
    # the training data is checked first, before a tokenizer is trained on it
    assert "missing.txt: no such --train_file. Check the path." in proc.stderr
    assert not (tmp_path / "out").exists()


@pytest.mark.slow
def test_gpu_fsdp_check_script_runs_end_to_end_in_its_cpu_rehearsal(tmp_path):
    # The lead runs bench/gpu_fsdp_check.sh once on a GPU; its CPU rehearsal (tiny model, fp32)
    # goes through the same corpus generation, launch with fsdp.yaml, and MFU report.
    run_script(
        ["bash", "bench/gpu_fsdp_check.sh"],
        env_extra={"GPU_CHECK_TINY": "1", "GPU_CHECK_STEPS": "7", "OUT": str(tmp_path / "report"),
                   "GPU_CHECK_WORK": str(tmp_path / "work")},
    )  # fmt: skip
    summary = json.loads((tmp_path / "report" / "gpu_fsdp_check_summary.json").read_text())
    assert summary["steady_tokens_per_second"] > 0 and 0 < summary["mfu"] < 1
    assert summary["flops_per_token"] == 6 * summary["parameters"] + 12 * 2 * 128 * 128
    assert summary["document_attention_check"]["max_logit_diff_packed_vs_alone"] < 1e-4
    assert summary["distributed_type"] == "NO"  # accelerate ignores FSDP without a GPU
    assert "RESULT tokens/s" in (tmp_path / "report" / "gpu_fsdp_check.log").read_text()
    assert not (tmp_path / "work" / "run").exists()  # the model folder is removed


def test_without_output_dir_the_base_model_goes_where_the_next_steps_look_for_it(tmp_path, monkeypatch):
    import run_pretrain
    from study_common import DEFAULT_BASE_MODEL_DIR

    monkeypatch.chdir(tmp_path)
    given = run_pretrain.parse_arguments(["--train_file", "corpus.txt"])[2]
    assert given.output_dir == str(DEFAULT_BASE_MODEL_DIR) == "runs/pretrain"
    explicit = run_pretrain.parse_arguments(["--train_file", "corpus.txt", "--output_dir", "elsewhere"])[2]
    assert explicit.output_dir == "elsewhere"
