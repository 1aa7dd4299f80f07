"""build_pairs.py end to end: the Hub copy replaces an earlier push's shards, and a listing that fails other
than 404 stops the push before anything is committed."""

import json
from pathlib import Path

import pytest

import build_pairs

pytestmark = pytest.mark.slow

EN = ["Tibetans drink butter tea.", "Monks eat tsampa.", "Lhasa celebrates the new year.", "The valleys are high."]
BO = ["བོད་རིགས་ཀྱིས་ཇ་མར་འཐུང་།", "བོད་རིགས་གྲྭ་བཙུན་ཤ་ཟ།", "ལྷ་སའི་ལོ་གསར་ལ་རྩམ་པ་ཟ།", "ཡུལ་ལུང་མཐོ་པོ་ཡོད།"]


def write_jsonl(path: Path, records) -> Path:
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records), encoding="utf-8")
    return path


def hub_whose_listing_fails(root: Path, statuses: list[int]):
    """The stand-in Hub, except that listing a repository's files answers ``statuses`` in turn (the last one from
    then on); every listing call is recorded in ``hub.listings``."""
    from hub_server import LocalHub

    hub = LocalHub(root)
    hub.listings = []

    class FailingListing(hub.server.RequestHandlerClass):
        def _api(self, method, repo_type, repo_id, rest, query):
            if statuses and method == "GET" and rest and rest[0] == "tree":
                status = statuses[min(len(hub.listings), len(statuses) - 1)]
                hub.listings.append(status)
                return self._error(status, f"listing answered {status}")
            return super()._api(method, repo_type, repo_id, rest, query)

    hub.server.RequestHandlerClass = FailingListing
    return hub


# [500, 501]: a server error huggingface_hub retries (after 1 s), then one it does not retry, so the failure
# surfaces without the client's whole backoff (1+2+4+8+8 s for a 500 that persists); [401]: refused; []: works.
@pytest.mark.parametrize("statuses", [[500, 501], [401], []], ids=["500", "401", "None"])
def test_push_replaces_earlier_shards_and_stops_when_the_listing_fails_other_than_404(tmp_path, tiny_model_dir,
                                                                                     statuses):  # fmt: skip
    import os
    import subprocess
    import sys

    pairs_file = write_jsonl(tmp_path / "pairs.jsonl", [{"en": e, "bo": b} for e, b in zip(EN, BO)])
    stale = {"data/train-00000-of-00002.parquet": b"earlier build", "data/train-00001-of-00002.parquet": b"earlier"}
    with hub_whose_listing_fails(tmp_path / "hub", statuses) as hub:
        hub.add_files("tester/cpt-bo", stale, repo_type="datasets")
        env = dict(os.environ, HF_ENDPOINT=hub.endpoint, HF_TOKEN="hf_local_test_token",
                   HF_HUB_DISABLE_TELEMETRY="1", HF_HUB_DISABLE_XET="1", HF_HUB_OFFLINE="0")  # fmt: skip
        proc = subprocess.run([sys.executable, "build_pairs.py", "--lang", "bo", "--pairs_files", str(pairs_file),
                               "--tgt_column", "bo", "--tokenizer_name", str(tiny_model_dir), "--output_dir",
                               str(tmp_path / "out"), "--push_to_hub", "--hub_dataset_id", "tester/cpt-bo"],
                              cwd=Path(build_pairs.__file__).parent, env=env, capture_output=True, text=True)  # fmt: skip
        files = hub.files("tester/cpt-bo", "datasets")
        unhandled = hub.unhandled
        listings = hub.listings
        card = hub.root / "datasets" / "tester/cpt-bo" / "README.md"
        card = card.read_text(encoding="utf-8") if card.is_file() else ""
    if not statuses:  # the listing works: the earlier build's shards are deleted in the same commit
        assert proc.returncode == 0, proc.stderr[-3000:]
        assert files == ["README.md", "build_stats.json", "data/train-00000-of-00001.parquet"]
        assert unhandled == [], f"the clients made calls the stand-in does not serve: {unhandled}"
        # the card keeps its setting and tags, with the metadata push_to_hub wrote for the data files added
        assert "| lang | bo |" in card and "- lang-bo" in card
        assert "path: data/train-*" in card and "dataset_info:" in card
    else:  # nothing pushed, so the repository never mixes two builds; the error says why
        assert proc.returncode != 0
        assert "could not list the files of the Hub dataset tester/cpt-bo" in proc.stderr
        assert listings == statuses  # a 500 is retried, and the status that stops the push is the final answer
        assert str(statuses[-1]) in proc.stderr and "nothing was pushed" in proc.stderr
        assert files == sorted(stale)
