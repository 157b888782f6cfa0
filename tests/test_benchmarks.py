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
# The step of `benchmarks.device_check --tiny` (test_device_check.py): the paired and overheads
# runs below compile its programs (default, ynn-conv, no guard) once for the session's cache.
DEVICE_CHECK_STEP = ["--attack-steps", "1", "--dtype", "bfloat16"]


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
    """JAX variants (a compiler option among them) and, with --torch-variants, each PyTorch
    setup timed in the same rounds and compared with each JAX variant. The compile variant uses
    the aot_eager backend here (Dynamo's capture and AOTAutograd's forward/backward split, no
    code generation): inductor's first compile of even this tiny model takes 30-65 s on the
    2-core machine (it works there; benchmarks/README.md)."""

    out = tmp_path / "paired.json"
    variants = "eager,channels_last,compile+channels_last+bf16"
    train_step.main(
        [*TINY, *DEVICE_CHECK_STEP, "--paired", "xla,xla+ynn-conv"]
        + ["--torch-variants", variants]
        + ["--torch-compile-backend", "aot_eager", "--json", str(out)]
    )
    saved = json.loads(out.read_text())
    assert saved["benchmark"] == "train_step_paired" and len(saved["rounds"]) == 2
    names = ["torch", "torch:channels_last", "torch:compile+channels_last+bf16"]
    assert list(saved["variants"]) == ["xla", "xla+ynn-conv", *names]
    options = saved["variants"]["xla+ynn-conv"]["compiler_options"]
    assert "INDIVIDUAL_CONVOLUTION" in options[xla_options.YNN_FUSION_OPTION]
    assert saved["variants"]["xla"]["compiler_options"] == xla_options.compiler_options()
    for name, v in saved["variants"].items():
        assert len(v["step_s_all"]) == 2 and v["images_per_s"] > 0, name
    frameworks = [saved["variants"][n]["framework"].split(" ", 2)[2] for n in names]
    assert frameworks == [
        "eager bf16-autocast (cpu)",  # --dtype bfloat16: every PyTorch setup autocasts
        "eager channels_last bf16-autocast (cpu)",
        "compile(aot_eager) channels_last bf16-autocast (cpu)",
    ]
    compiled = saved["variants"]["torch:compile+channels_last+bf16"]
    assert_positive(compiled, ("first_call_s",), "compile")
    assert list(saved["ratio_jax_over_torch_variants"]) == names
    for ratios in saved["ratio_jax_over_torch_variants"].values():
        assert_positive(ratios, ("xla", "xla+ynn-conv"), "ratio")
    assert saved["ratio_jax_over_torch"] == saved["ratio_jax_over_torch_variants"]["torch"]
    with pytest.raises(ValueError, match="--torch-variants: bad variant 'compile\\+nhwc'"):
        train_step.main([*TINY, "--paired", "xla", "--torch-variants", "compile+nhwc"]
                        + ["--json", str(tmp_path / "bad.json")])  # fmt: skip


@pytest.mark.parametrize("channels_last", [False, True])
def test_compiled_and_channels_last_reference_steps_equal_the_eager_one(channels_last):
    """One TRADES step from the same weights and batch: the compiled (aot_eager) and the
    channels_last reference give the eager NCHW step's loss and weights."""
    import torch

    from score_jax.torch_bridge.models import build_torch_model

    rng = np.random.default_rng(0)
    image = rng.integers(0, 256, (4, 8, 8, 3), np.uint8)
    label = np.arange(4) % 10
    spec = {
        "mode": "train",
        "model_name": "small-cnn",
        "num_classes": 10,
        "model_kwargs": {"width": 4, "hidden": 8},
        "dtype": "float32",
        "attack": {"eps": 8 / 255, "step_size": 2 / 255, "num_steps": 2, "init": "normal"},
        "loss": {"type": "trades", "kind": "se", "beta": 4.0},
        "optim": {"learning_rate": 0.1, "momentum": 0.9, "nesterov": True}
        | {"weight_decay": 5e-4, "weight_decay_batchnorm": False},
        "ema": {"decay": 0.995, "warmup_steps": 0},
        "augment": {"crop_padding": 2, "flip": True},
    }
    torch.manual_seed(0)
    weights = build_torch_model("small-cnn", 10, width=4, hidden=8).state_dict()
    torch._dynamo.reset()  # compiled afresh here, whatever ran before in this process
    results = []
    for variant in (
        {},
        {"compile": True, "compile_backend": "aot_eager", "channels_last": channels_last},
    ):
        ref, images, labels = torch_reference.build({**spec, **variant}, weights, image, label)
        loss = ref.train_step(images, labels)
        results.append((loss, {k: v.detach().clone() for k, v in ref.model.state_dict().items()}))
    assert isinstance(ref.forward, torch._dynamo.eval_frame.OptimizedModule)
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] > 0  # Dynamo captured graphs
    (eager_loss, eager_state), (loss, state) = results
    assert loss == pytest.approx(eager_loss, rel=1e-5)
    for k, v in eager_state.items():
        torch.testing.assert_close(state[k], v, rtol=1e-5, atol=1e-6, msg=k)


def test_overheads_benchmark(tmp_path):
    """Guard and checksums side by side at a tiny shape: every time positive and paired; the
    step without the guard computes the guarded step's state (the guard only checks and
    selects), so the comparison is of the same step."""
    import jax

    from benchmarks import common, overheads
    from score_jax import train

    out = tmp_path / "overheads.json"
    argv = [*TINY, *DEVICE_CHECK_STEP, "--saves", "2", "--workdir", str(tmp_path / "ck")]
    overheads.main([*argv, "--json", str(out)])
    saved = json.loads(out.read_text())
    guard = saved["guard"]
    for name in overheads.GUARD:
        assert len(guard["times"][name]["step_s"]) == 2
    assert_positive(guard, ("with_guard_step_s_median", "without_guard_step_s_median"), "guard")
    assert all(math.isfinite(guard[k]) for k in ("overhead_ms", "overhead_pct"))
    sums = saved["checksums"]
    assert sums["state_bytes"] > 0 and sums["checksum_s_median"] > 0
    for part in ("save_blocking", "save_total", "restore"):
        for name in overheads.CHECKSUMS:
            assert len(sums["times"][name][f"{part}_s"]) == 2
            assert sums[part][f"{name}_{part}_s_median"] > 0

    config = common.make_config(
        "small-cnn", 8, "trades-se", dtype="bfloat16", conv_impl="xla", attack_steps=1
    )
    setup = common.bench_setup(config, common.synthetic_dataset(8, 32), 1)
    state = setup.initial_state()
    batch = train.shard_batch(setup.batcher.batch(0), setup.mesh)
    key = common.device_key(setup)
    guarded, _ = setup.compile_train_step()(overheads._copy(state), batch, key)
    unguarded, metrics = setup.compile_train_step(divergence_guard=False)(state, batch, key)
    assert "finite" not in metrics and int(unguarded.step) == 1
    jax.tree.map(np.testing.assert_array_equal, jax.device_get(guarded), jax.device_get(unguarded))
