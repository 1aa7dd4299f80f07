"""The Hub stand-in (tests/hub_server.py) serves what the real clients read and checks what they push.

Every later test of Hub reads and pushes (datasets streamed from the Hub, released checkpoints, pushes of
datasets and checkpoints) relies on these behaviours, so they are pinned here with the real
huggingface_hub, datasets and transformers clients in online mode.
"""

from __future__ import annotations

import io
import json
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from conftest import build_tiny_model

WIKIPEDIA_CARD = """---
configs:
- config_name: 20231101.en
  data_files:
  - split: train
    path: 20231101.en/train-*
- config_name: 20231101.ko
  data_files:
  - split: train
    path: 20231101.ko/train-*
---
# Wikipedia (stand-in)
"""


def _parquet(columns: dict) -> bytes:
    buffer = io.BytesIO()
    pq.write_table(pa.table(columns), buffer)
    return buffer.getvalue()


@pytest.fixture(scope="module")
def online_hub(tmp_path_factory):
    """One stand-in Hub for the module (the clients cache the endpoint in-process), an empty client cache,
    online (no offline flags), Xet off (plain HTTP + LFS). Tests use distinct repository names."""
    import datasets
    import huggingface_hub.constants as hub_constants
    from hub_server import LocalHub

    root = tmp_path_factory.mktemp("online_hub")
    with LocalHub(root / "hub") as hub, pytest.MonkeyPatch.context() as patch:
        for flag in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE"):
            patch.delenv(flag, raising=False)
        patch.setenv("HF_ENDPOINT", hub.endpoint)
        patch.setenv("HF_TOKEN", "hf_local_test_token")
        patch.setenv("HF_HOME", str(root / "hf_home"))
        patch.setenv("HF_HUB_DISABLE_XET", "1")
        patch.setattr(hub_constants, "ENDPOINT", hub.endpoint)
        patch.setattr(
            hub_constants, "HUGGINGFACE_CO_URL_TEMPLATE", hub.endpoint + "/{repo_id}/resolve/{revision}/{filename}"
        )
        patch.setattr(hub_constants, "HF_HUB_OFFLINE", False)
        patch.setattr(hub_constants, "HF_HUB_DISABLE_XET", True)
        patch.setattr(hub_constants, "HF_HUB_CACHE", str(root / "hf_home" / "hub"))
        patch.setattr(datasets.config, "HF_ENDPOINT", hub.endpoint)
        patch.setattr(datasets.config, "HF_HUB_OFFLINE", False)
        patch.setattr(datasets.config, "HF_DATASETS_CACHE", root / "hf_home" / "datasets")
        yield hub
    assert hub.unhandled == [], f"the clients made calls the stand-in does not serve: {hub.unhandled}"


def test_parquet_configs_of_a_dataset_repo_load_streamed_and_downloaded(online_hub):
    import datasets

    rows = {"id": ["1", "2"], "url": ["u1", "u2"], "title": ["A", "B"], "text": ["Alpha text.", "Beta text."]}
    online_hub.add_files(
        "wikimedia/wikipedia",
        {
            "README.md": WIKIPEDIA_CARD,
            "20231101.en/train-00000-of-00001.parquet": _parquet(rows),
            "20231101.ko/train-00000-of-00001.parquet": _parquet(
                {"id": ["9"], "url": ["u9"], "title": ["가"], "text": ["한국어 문서."]}
            ),
        },
        repo_type="datasets",
    )
    for streaming in (True, False):
        loaded = datasets.load_dataset("wikimedia/wikipedia", "20231101.en", split="train", streaming=streaming)
        assert [row["text"] for row in loaded] == rows["text"]
    korean = datasets.load_dataset("wikimedia/wikipedia", "20231101.ko", split="train", streaming=True)
    assert [row["text"] for row in korean] == ["한국어 문서."]


def test_a_gated_dataset_needs_a_token_and_serves_its_jsonl_files_with_one(online_hub):
    import datasets

    name = "mn-crawl-only-release-20231127.jsonl"
    online_hub.add_files("pkupie/mc2_corpus", {name: '{"text": "ᠮᠣᠩᠭᠣᠯ"}\n{"text": "ᠬᠦᠮᠦᠨ"}\n'}, repo_type="datasets")
    online_hub.gate("pkupie/mc2_corpus")
    with pytest.MonkeyPatch.context() as patch, pytest.raises(datasets.exceptions.DatasetNotFoundError, match="gated"):
        patch.delenv("HF_TOKEN")
        datasets.load_dataset("pkupie/mc2_corpus", data_files=name, split="train", streaming=True, token=False)
    loaded = datasets.load_dataset("pkupie/mc2_corpus", data_files=name, split="train", streaming=True, token="hf_x")
    assert [row["text"] for row in loaded] == ["ᠮᠣᠩᠭᠣᠯ", "ᠬᠦᠮᠦᠨ"]


def test_pushes_negotiate_lfs_for_weights_and_regular_uploads_for_small_text(online_hub, tiny_model_dir):
    from huggingface_hub import HfApi

    model_dir = tiny_model_dir
    api = HfApi()
    api.create_repo("org/run", exist_ok=True)
    api.upload_folder(repo_id="org/run", folder_path=str(model_dir))
    modes = {path: mode for _, path, mode in online_hub.commits[-1]["operations"]}
    assert modes["model.safetensors"] == "lfs"
    assert modes["config.json"] == "regular"
    assert (online_hub.root / "models" / "org" / "run" / "model.safetensors").read_bytes() == (
        model_dir / "model.safetensors"
    ).read_bytes()


def test_checkpoints_published_as_folders_are_read_back_and_a_commit_id_resolves_to_its_files(online_hub, tmp_path):
    import torch
    from huggingface_hub import HfApi, snapshot_download
    from transformers import AutoModelForCausalLM

    early = build_tiny_model(tmp_path / "early", seed=1)
    late = build_tiny_model(tmp_path / "late", seed=2)
    api = HfApi()
    api.create_repo("org/curve", exist_ok=True)
    api.upload_folder(repo_id="org/curve", folder_path=str(early), path_in_repo="checkpoint-10")
    api.upload_folder(repo_id="org/curve", folder_path=str(late))

    from_folder = AutoModelForCausalLM.from_pretrained("org/curve", subfolder="checkpoint-10")
    final = AutoModelForCausalLM.from_pretrained("org/curve")
    reference = AutoModelForCausalLM.from_pretrained(early)
    for name, weight in reference.state_dict().items():
        assert torch.equal(from_folder.state_dict()[name], weight)
    assert not torch.equal(
        final.state_dict()["model.embed_tokens.weight"], reference.state_dict()["model.embed_tokens.weight"]
    )

    snapshot = Path(snapshot_download("org/curve", allow_patterns=["checkpoint-10/*"]))
    downloaded = sorted(p.name for p in (snapshot / "checkpoint-10").iterdir())
    assert downloaded == sorted(p.name for p in early.iterdir())
    # The commit id resolves to its files, and changes when the repository moves on.
    head = api.model_info("org/curve").sha
    assert api.list_repo_files("org/curve", revision=head) == api.list_repo_files("org/curve")
    api.upload_file(path_or_fileobj=b"{}", path_in_repo="extra.json", repo_id="org/curve")
    assert "extra.json" in api.list_repo_files("org/curve")
    assert api.model_info("org/curve").sha != head


def test_deleted_files_leave_the_repository_in_the_same_commit(online_hub, tmp_path):
    from huggingface_hub import CommitOperationAdd, CommitOperationDelete, HfApi

    api = HfApi()
    api.create_repo("org/data", repo_type="dataset", exist_ok=True)
    stale = tmp_path / "old.parquet"
    stale.write_bytes(_parquet({"text": ["old"]}))
    api.upload_file(
        path_or_fileobj=str(stale),
        path_in_repo="data/train-00001-of-00002.parquet",
        repo_id="org/data",
        repo_type="dataset",
    )
    api.create_commit(
        "org/data",
        [
            CommitOperationAdd("data/train-00000-of-00001.parquet", str(stale)),
            CommitOperationDelete("data/train-00001-of-00002.parquet"),
        ],
        repo_type="dataset",
        commit_message="rebuild",
    )
    assert online_hub.files("org/data", "datasets") == ["data/train-00000-of-00001.parquet"]
    assert ("delete", "data/train-00001-of-00002.parquet", None) in online_hub.commits[-1]["operations"]


def test_one_languages_file_of_a_gated_corpus_is_all_build_pairs_and_run_density_read(
    online_hub, tiny_model_dir, tmp_path
):
    import build_pairs
    import run_density

    mongolian = ["ᠮᠣᠩᠭᠣᠯ ᠬᠦᠮᠦᠨ ᠨᠠᠭᠠᠳᠤᠮ", "ᠮᠣᠩᠭᠣᠯ ᠤ ᠪᠠᠶᠠᠷ", "ᠬᠦᠮᠦᠨ ᠢ ᠲᠡᠮᠳᠡᠭᠯᠡᠨ"]
    tibetan = ["བོད་རིགས་ཀྱིས་ཇ་མར་འཐུང་།", "ལྷ་སའི་ལོ་གསར།"]
    online_hub.add_files(
        "pkupie/mc2_corpus_two",
        {
            "mn-crawl-only-release-20231127.jsonl": "".join(json.dumps({"text": t}) + "\n" for t in mongolian),
            "bo-crawl-only-release-20231127.jsonl": "".join(json.dumps({"text": t}) + "\n" for t in tibetan),
        },
        repo_type="datasets",
    )
    online_hub.gate("pkupie/mc2_corpus_two")
    pairs = tmp_path / "pairs.jsonl"
    pairs.write_text(json.dumps({"en": "The Mongols herd horses.", "mn": mongolian[0]}) + "\n", encoding="utf-8")
    output = build_pairs.main([
        "--lang", "mn", "--pairs_files", str(pairs), "--mono_dataset", "pkupie/mc2_corpus_two",
        "--mono_data_files", "mn-crawl-only-release-20231127.jsonl", "--streaming",
        "--tokenizer_name", str(tiny_model_dir), "--block_size", "128", "--output_dir", str(tmp_path / "data"),
    ])  # fmt: skip
    stats = json.loads((output / "build_stats.json").read_text())
    assert stats["read"]["mono"] == stats["kept"]["mono"] == len(mongolian)  # no Tibetan document was read

    corpus = run_density.DatasetCorpus(
        "pkupie/mc2_corpus_two", None, "train", "text", True, "mn", ["mn-crawl-only-release-20231127.jsonl"]
    )
    from collections import Counter

    documents = list(corpus.iter_documents(Counter()))
    assert documents == mongolian
