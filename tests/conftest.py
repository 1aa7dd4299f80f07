import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]
PAPER_CLOZE_DIR = REPO_ROOT.parent / "shared" / "data" / "paper-culture-cloze"
sys.path.insert(0, str(REPO_ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))


@pytest.fixture
def local_hub(tmp_path, monkeypatch):
    """A stand-in Hub on 127.0.0.1; HF_ENDPOINT and a token point huggingface_hub at it."""
    from hub_server import LocalHub

    with LocalHub(tmp_path / "hub") as hub:
        monkeypatch.setenv("HF_ENDPOINT", hub.endpoint)
        monkeypatch.setenv("HF_TOKEN", "hf_local_test_token")
        monkeypatch.setenv("HF_HUB_DISABLE_TELEMETRY", "1")
        yield hub


@pytest.fixture
def paper_cloze_dir():
    if not PAPER_CLOZE_DIR.is_dir():
        pytest.skip(f"{PAPER_CLOZE_DIR} is absent (the paper's released questions live in ../shared)")
    return PAPER_CLOZE_DIR


def run_script(args: list[str], cwd=REPO_ROOT, env_extra: dict | None = None, timeout: int = 900):
    """Run a command as a user would; raise with its output when it fails."""
    env = dict(os.environ, PYTHONUNBUFFERED="1", TOKENIZERS_PARALLELISM="false", HF_HUB_OFFLINE="0")
    env.update(env_extra or {})
    proc = subprocess.run(args, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    if proc.returncode != 0:
        raise AssertionError(f"{' '.join(map(str, args))} failed ({proc.returncode}):\n{proc.stdout[-4000:]}\n{proc.stderr[-6000:]}")
    return proc
