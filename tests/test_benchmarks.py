"""The benchmark harness runs end to end at a tiny shape and writes complete JSON (not a speed)."""

import json
import math

import numpy as np
import pytest

pytest.importorskip("torch")

from benchmarks import conv, torch_reference, train_step  # noqa: E402
from benchmarks import eval as eval_bench  # noqa: E402
from score_jax import xla_options  # noqa: E402

TINY = ["--model", "small-cnn", "--batch", "8", "--image-size", "8", "--conv-impl", "xla"]
TINY += ["--steps", "2", "--warmup", "0", "--devices", "1"]


def assert_positive(d: dict, keys: tuple[str, ...], where: str) -> None:
    for k in keys:
        assert k in d, f"{where} lacks {k}"
        v = d[k]
        assert isinstance(v, int | float) and math.isfinite(v) and v > 0, f"{where}.{k} = {v!r}"


def test_train_step_benchmark(tmp_path):
    out = tmp_path / "train.json"
    result = train_step.main([*TINY, "--attack-steps", "2", "--breakdown", "--json", str(out)])
    saved = json.loads(out.read_text())
    assert saved["benchmark"] == "train_step" and saved["args"]["loss"] == "trades-se"
    assert_positive(saved, ("ratio_jax_over_torch", "cpu_ratio_jax_over_torch"), "result")
    jax_keys = ("compile_s", "step_s_median", "step_cpu_s_median", "images_per_s", "xla_flops_raw")
    jax_keys += ("attack_iteration_flops", "flops_per_step", "flop_per_s", "peak_rss_mb")
    assert_positive(saved["jax"], jax_keys, "jax")
    assert saved["jax"]["flops_per_step"] > saved["jax"]["xla_flops_raw"]  # the loop's other step
    assert len(saved["jax"]["step_s_all"]) == 2 and len(saved["jax"]["loadavg_before"]) == 3
    torch_keys = ("step_s_median", "step_cpu_s_median", "images_per_s", "peak_rss_mb")
    assert_positive(saved["torch"], torch_keys, "torch")
    assert result["ratio_jax_over_torch"] == saved["ratio_jax_over_torch"]
    # The step's parts: the timed ones must be positive; the ones derived by subtraction
    # (JAX: one attack iteration; PyTorch: the whole attack; both: "other") only finite, since
    # on a busy machine a difference of two medians may come out <= 0.
    timed = {
        "jax": ("forward_ms", "attack_total_ms", "loss_grad_ms", "update_ema_ms"),
        "torch": ("forward_ms", "attack_iteration_ms", "loss_grad_ms", "update_ema_ms"),
    }
    derived = {"jax": ("attack_iteration_ms", "other_ms"), "torch": ("attack_total_ms", "other_ms")}
    for framework in ("jax", "torch"):
        breakdown = saved[framework]["breakdown"]
        assert_positive(breakdown, timed[framework], framework)
        for k in derived[framework]:
            assert math.isfinite(breakdown[k]), f"{framework}.{k} = {breakdown[k]!r}"


def test_eval_benchmark(tmp_path):
    # --no-torch: the subprocess path is covered above, the torch evaluation in-process below.
    out = tmp_path / "eval.json"
    eval_bench.main(
        [*TINY, "--attack-steps", "2", "--train-attack-steps", "0", "--loss", "pgd-at"]
        + ["--num-train", "64", "--pipeline-steps", "2", "--rounds", "1", "--no-torch"]
        + ["--json", str(out)]
    )
    saved = json.loads(out.read_text())
    assert saved["benchmark"] == "eval" and saved["jax"]["attack"]["num_steps"] == 2
    assert_positive(saved["jax"], ("compile_s", "step_s_median", "images_per_s"), "jax")
    pipe = saved["pipeline"]
    keys = ("resident_steps_per_s", "real_steps_per_s", "prefetched_steps_per_s")
    assert_positive(pipe, (*keys, "host_batch_ms", "host_batch_pct_of_step"), "pipeline")
    for k in ("overhead_pct", "prefetched_overhead_pct"):
        assert math.isfinite(pipe[k])  # the sign is noise at this size


@pytest.mark.parametrize("mode", ["train", "eval"])
def test_torch_reference(tmp_path, mode):
    rng = np.random.default_rng(0)
    batch = tmp_path / "batch.npz"
    np.savez(batch, image=rng.integers(0, 256, (4, 8, 8, 3), np.uint8), label=np.arange(4))
    spec = {
        "mode": mode,
        "model_name": "small-cnn",
        "num_classes": 10,
        "model_kwargs": {"width": 4, "hidden": 8},
        "state_dict": None,
        "batch": str(batch),
        "steps": 2,
        "warmup": 0,
        "dtype": "float32",
        "threads": None,
        "breakdown": True,
        "attack": {"eps": 8 / 255, "step_size": 2 / 255, "num_steps": 2, "init": "uniform"},
        "loss": {"type": "trades", "kind": "kl", "beta": 4.0},
        "optim": {"learning_rate": 0.1, "momentum": 0.9, "nesterov": True}
        | {"weight_decay": 5e-4, "weight_decay_batchnorm": False},
        "ema": {"decay": 0.995, "warmup_steps": 1},
        "augment": {"crop_padding": 2, "flip": True},
    }
    result = torch_reference.run(spec)
    assert_positive(result, ("step_s_median", "images_per_s", "peak_rss_mb", "threads"), mode)
    if mode == "train":
        parts = ("forward_ms", "attack_iteration_ms", "loss_grad_ms", "update_ema_ms")
        assert_positive(result["breakdown"], parts, "breakdown")


def test_conv_benchmark(tmp_path):
    out = tmp_path / "conv.json"
    conv.main(["--batch", "2", "--size", "6", "--channels", "3", "--steps", "1", "--loop", "2"]
              + ["--json", str(out)])  # fmt: skip
    saved = json.loads(out.read_text())
    assert set(saved["impls"]) == {"xla", "im2col", "hybrid", "torch"}
    for name, times in saved["impls"].items():
        assert_positive(times, ("fwd_ms", "fwd_bwd_ms", "fwd_xgrad_ms"), name)


def test_conv_layers_benchmark(tmp_path):
    out = tmp_path / "layers.json"
    conv.main(["--layers", "wrn-16-4", "--batch", "1", "--steps", "1", "--no-torch"]
              + ["--json", str(out)])  # fmt: skip
    saved = json.loads(out.read_text())
    assert [tuple(r["layer"].values()) for r in saved["layers"]] == list(conv.WRN_16_4_LAYERS)
    for row in saved["layers"]:
        assert "torch" not in row
        for impl in conv.JAX_IMPLS:
            assert_positive(row[impl], ("fwd_ms", "kernel_grad_ms", "input_grad_ms"), impl)


def test_conv_layers_benchmark_in_a_loop_with_torch(tmp_path):
    out = tmp_path / "layers.json"
    conv.main(["--layers", "small-cnn", "--batch", "2", "--steps", "1", "--layer-loop", "3"]
              + ["--json", str(out)])  # fmt: skip
    saved = json.loads(out.read_text())
    assert [tuple(r["layer"].values()) for r in saved["layers"]] == list(conv.SMALL_CNN_LAYERS)
    # 8x8 -> 4x4 at stride 2, 32 -> 64 channels: 2 * batch * 16 pixels * 9 * 32 * 64 FLOPs
    assert saved["layers"][1]["gflop_fwd"] == pytest.approx(2 * 2 * 16 * 9 * 32 * 64 / 1e9)
    assert set(saved["matmul_gflops"]) == {"jax", "torch"}
    assert_positive(saved["matmul_gflops"], ("jax", "torch"), "matmul")
    for row in saved["layers"]:
        for impl in (*conv.JAX_IMPLS, "torch"):
            assert_positive(row[impl], ("fwd_ms", "kernel_grad_ms", "input_grad_ms"), impl)
            assert row[impl]["fwd_gflops"] == pytest.approx(
                row["gflop_fwd"] / row[impl]["fwd_ms"] * 1e3
            )


def test_paired_train_step_benchmark(tmp_path):
    out = tmp_path / "paired.json"
    paired = "xla,xla+ynn-conv"
    train_step.main([*TINY, "--attack-steps", "2", "--paired", paired, "--json", str(out)])
    saved = json.loads(out.read_text())
    assert saved["benchmark"] == "train_step_paired" and len(saved["rounds"]) == 2
    assert set(saved["variants"]) == {"xla", "xla+ynn-conv", "torch"}
    options = saved["variants"]["xla+ynn-conv"]["compiler_options"]
    assert "INDIVIDUAL_CONVOLUTION" in options[xla_options.YNN_FUSION_OPTION]
    assert saved["variants"]["xla"]["compiler_options"] == xla_options.compiler_options()
    for name, v in saved["variants"].items():
        assert len(v["step_s_all"]) == 2 and v["images_per_s"] > 0, name
    assert_positive(saved["ratio_jax_over_torch"], ("xla", "xla+ynn-conv"), "ratio")
