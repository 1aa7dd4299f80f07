"""configs/ (model architectures) and accelerate_configs/ (launch configs) say what they claim."""

import pytest
import torch
from accelerate.commands.config.config_args import load_config_from_file
from conftest import REPO_ROOT
from transformers import AutoConfig, AutoModelForCausalLM
from transformers.models.qwen2 import modeling_qwen2


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


ACCELERATE_CONFIGS = ["cpu", "single_gpu", "multi_gpu", "fsdp", "fsdp_multinode"]


@pytest.mark.parametrize("name", ACCELERATE_CONFIGS)
def test_accelerate_config_loads_and_says_when_to_use_it(name):
    path = REPO_ROOT / "accelerate_configs" / f"{name}.yaml"
    comments = [line for line in path.read_text().splitlines() if line.startswith("#")]
    assert len(comments) >= 3 and "accelerate launch --config_file" in "\n".join(comments)
    load_config_from_file(str(path))


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


def test_multi_gpu_configs_use_bf16_and_the_multinode_one_spans_machines():
    multi = load_config_from_file(str(REPO_ROOT / "accelerate_configs" / "multi_gpu.yaml"))
    assert str(multi.distributed_type) == "DistributedType.MULTI_GPU" and multi.mixed_precision == "bf16"
    nodes = load_config_from_file(str(REPO_ROOT / "accelerate_configs" / "fsdp_multinode.yaml"))
    assert nodes.num_machines == 2 and nodes.num_processes == 16
