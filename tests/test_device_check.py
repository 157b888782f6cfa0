"""`python -m benchmarks.device_check --tiny`: every part runs at a tiny shape and writes its
JSON (the harness, not a measurement); the real run's budget skips parts instead of overrunning."""

import json
import math
import os

import jax
import pytest

pytest.importorskip("torch")

from benchmarks import device_check  # noqa: E402


@pytest.mark.slow  # 60-150 s on the 2-core VM: five JAX step programs and Dynamo's captures
def test_tiny_device_check_writes_every_part(tmp_path):
    out = tmp_path / "dc"
    device_check.main(["--tiny", "--json-dir", str(out)])
    status = (out / "summary.md").read_text()
    for part in device_check.PARTS:
        assert f"| {part} | done in" in status
    read = {p: json.loads((out / f"{p}.json").read_text()) for p in device_check.PARTS}

    env = read["environment"]
    assert env["backend"] == jax.default_backend() and env["versions"]["jax"] == jax.__version__
    assert env["nvidia_smi"]

    smoke = read["smoke"]
    assert smoke["resumed"]["steps_before"] == [2] and smoke["logged_train_steps"] == [1, 2, 3, 4]
    assert smoke["resumed_from_step_2"] and smoke["resumed"]["results"]["step"] == 4
    assert smoke["checkpoint_steps"] == [2, 4] and smoke["config"]["model"]["dtype"] == "bfloat16"
    assert sorted(os.listdir(out / "smoke_workdir")) == sorted(
        ["config.json", "metrics.jsonl", "results.json", "run.lock", "tensorboard"]
    )  # the checkpoints removed, the logs kept

    p = read["paired"]
    jax_names = ["default", *(f"xla:{n}" for n in device_check.XLA_CANDIDATES["cpu"]), "no_guard"]
    torch_names = ["torch", "torch:channels_last", "torch:compile+channels_last"]
    assert list(p["variants"]) == [*jax_names, *torch_names]
    for name, v in p["variants"].items():
        assert len(v["step_s_all"]) == device_check.TINY.rounds and v["step_s_median"] > 0, name
    assert not p["variants"]["no_guard"]["divergence_guard"]
    assert "aot_eager" in p["variants"]["torch:compile+channels_last"]["framework"]
    assert p["flops_per_step"] > 0 and p["mfu"] is None and "--peak-flops" in p["mfu_note"]
    assert all(math.isfinite(v) for v in p["guard"].values())
    assert list(p["ratio_jax_over_torch_variants"]) == torch_names

    sums = read["overheads"]
    assert sums["state_bytes"] > 0 and sums["save_total"]["with_checksums_save_total_s_median"] > 0
    assert not os.path.exists(out / "overheads_workdir")

    aa = read["autoattack"]
    # Two implementations, one model and the same examples: the same clean accuracy.
    assert aa["jax"]["clean_accuracy"] == aa["torch"]["clean_accuracy"]
    assert aa["jax"]["num_examples"] == 8


def test_budget_skips_parts_instead_of_overrunning(tmp_path):
    result = device_check.main(["--json-dir", str(tmp_path), "--budget-s", "10"])
    assert result["results"]["environment"]["backend"] == jax.default_backend()
    for part in device_check.PARTS[1:]:
        assert result["status"][part].startswith("skipped: ")
    assert "skipped: " in (tmp_path / "summary.md").read_text()
