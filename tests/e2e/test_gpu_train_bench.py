"""bench/gpu_train_bench.sh: its CPU rehearsal goes through the whole sweep (run_pretrain under
accelerate, both batch layouts), reports every configuration with tokens/s,
MFU by its stated formula and the isolation check, and reports a failing one without stopping."""

import json

import pytest
from conftest import run_script


@pytest.mark.slow
def test_gpu_train_bench_rehearsal_reports_every_configuration_and_goes_on_after_a_failure(tmp_path):
    run_script(
        ["bash", "bench/gpu_train_bench.sh"],
        env_extra={"BENCH_TINY": "1", "BENCH_STEPS": "6", "OUT": str(tmp_path / "report"),
                   "BENCH_WORK": str(tmp_path / "work")},
    )  # fmt: skip
    rows = {row["name"]: row for row in map(json.loads, (tmp_path / "report" / "gpu_train_bench.jsonl").open())}
    assert list(rows) == ["sdpa-b2", "sdpa-b2-flattened", "flex-b2"]
    for name in ("sdpa-b2", "sdpa-b2-flattened"):
        row = rows[name]
        assert row["status"] == "ok" and row["tokens_per_second"] > 0 and 0 < row["mfu"] < 1
        # MFU's formula, 6N + 12 n_layers d_attn k: tiny.json has 2 layers, d_attn = hidden size 128
        keys = row["attended_keys_per_token"]  # from the run's own windows, below one causal window's mean
        assert row["flops_per_token"] == 6 * row["parameters"] + 12 * 2 * 128 * keys and 1 < keys < (128 + 1) / 2
        assert row["mfu"] == pytest.approx(row["tokens_per_second"] * row["flops_per_token"] / 989e12, rel=1e-3)
        assert row["isolation"]["max_logit_diff_other_documents_changed"] < 1e-6
    assert rows["sdpa-b2"]["isolation"]["layout"] == "padded"
    assert rows["sdpa-b2-flattened"]["isolation"]["layout"] == "flattened"
    assert rows["flex-b2"]["status"] == "failed (error)" and "does not train on the CPU" in rows["flex-b2"]["last_line"]
    table = (tmp_path / "report" / "gpu_train_bench_table.md").read_text()
    assert (
        table.count("\n") == 2 + len(rows)
        and "BEST sdpa-b" in (tmp_path / "report" / "gpu_train_bench.log").read_text()
    )
    assert not (tmp_path / "work" / "runs").exists()  # the models are removed
