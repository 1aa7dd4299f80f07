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
    """A stand-in Hub on 127.0.0.1; HF_ENDPOINT and a token point huggingface_hub at it (for subprocesses).

    The stand-in stores large and binary files through the LFS protocol, not Xet, so Xet is off."""
    from hub_server import LocalHub

    with LocalHub(tmp_path / "hub") as hub:
        monkeypatch.setenv("HF_ENDPOINT", hub.endpoint)
        monkeypatch.setenv("HF_TOKEN", "hf_local_test_token")
        monkeypatch.setenv("HF_HUB_DISABLE_TELEMETRY", "1")
        monkeypatch.setenv("HF_HUB_DISABLE_XET", "1")
        yield hub


@pytest.fixture(scope="module")
def one_torch_thread():
    """Tiny models run fastest on one thread, and do not thrash when other processes share the cores.
    Modules of tiny-model tests use it with ``pytestmark = pytest.mark.usefixtures("one_torch_thread")``."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def paper_cloze_dir():
    if not PAPER_CLOZE_DIR.is_dir():
        pytest.skip(f"{PAPER_CLOZE_DIR} is absent (the paper's released questions live in ../shared)")
    return PAPER_CLOZE_DIR


def toy_plan(out: Path, steps: list):
    """A plan of hand-made steps under a toy preset (the runner reads only a plan's steps and output folder)."""
    from run_study import Plan, Preset

    preset = Preset(name="toy", description="toy", langs=[], seeds=[], jobs=1, budget_s=0, reference_machine="-")
    return Plan(preset, str(out), steps, [], {})


def python_step(name: str, code: str, outputs: list[str], **fields):
    """A step of a toy plan that runs ``python -c code``, named and titled ``name`` (kind world unless given)."""
    from run_study import Step

    return Step(
        **{"id": name, "kind": "world", "title": name, "command": [sys.executable, "-c", code], "outputs": outputs}
        | fields
    )


def run_script(args: list[str], cwd=REPO_ROOT, env_extra: dict | None = None, timeout: int = 900):
    """Run a command as a user would; raise with its output when it fails."""
    env = dict(os.environ, PYTHONUNBUFFERED="1", TOKENIZERS_PARALLELISM="false", HF_HUB_OFFLINE="0")
    env.update(env_extra or {})
    proc = subprocess.run(args, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    if proc.returncode != 0:
        raise AssertionError(
            f"{' '.join(map(str, args))} failed ({proc.returncode}):\n{proc.stdout[-4000:]}\n{proc.stderr[-6000:]}"
        )
    return proc


# Text in every script of the study, so a tiny tokenizer covers what tests feed it.
MULTI_SCRIPT_SAMPLE = [
    "The Korean people celebrate Chuseok in autumn with songpyeon rice cakes.",
    "한국 사람들은 가을에 추석을 지내며 송편을 먹는다.",
    "汉族的传统节日包括春节和中秋节，人们吃月饼。",
    "བོད་རིགས་ཀྱིས་ལོ་གསར་ལ་ཁ་ཟས་སྣ་ཚོགས་བཟོ་གི་ཡོད།",
    "ᠮᠣᠩᠭᠣᠯ ᠬᠦᠮᠦᠨ ᠨᠠᠭᠠᠳᠤᠮ ᠤ ᠪᠠᠶᠠᠷ ᠢ ᠲᠡᠮᠳᠡᠭᠯᠡᠨ᠎ᠡ᠃",
    'Café naïve façade 1234 — punctuation, digits; and "quotes"!',
]


def build_tiny_model(output_dir: Path, vocab_size: int = 400, seed: int = 0) -> Path:
    """Save a randomly initialised tiny Qwen2 model and a byte-level BPE tokenizer to ``output_dir``."""
    import torch
    from transformers import Qwen2Config, Qwen2ForCausalLM

    from run_pretrain import train_tokenizer  # the study's tokenizer recipe, in one place

    fast = train_tokenizer(MULTI_SCRIPT_SAMPLE * 4, vocab_size, show_progress=False)
    torch.manual_seed(seed)
    config = Qwen2Config(
        vocab_size=len(fast),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        tie_word_embeddings=True,
        eos_token_id=fast.eos_token_id,
        bos_token_id=fast.eos_token_id,
        pad_token_id=fast.pad_token_id,
        use_cache=False,
    )
    model = Qwen2ForCausalLM(config)
    output_dir.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(output_dir)
    fast.save_pretrained(output_dir)
    return output_dir


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Path:
    """A tiny random Qwen2 model + multi-script tokenizer on disk (shared by the whole test session)."""
    return build_tiny_model(tmp_path_factory.mktemp("tiny_model"))
