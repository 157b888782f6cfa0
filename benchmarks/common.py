"""What the benchmarks share: the machine, the benchmark config, a synthetic dataset, the setup
(`score_jax.setup.Setup` with the dataset and mesh injected), the PyTorch reference subprocess and
the JSON output.

`make_config` is configs/cifar10_ddpm.py (SGD Nesterov 0.9, weight decay 5e-4 not on BatchNorm,
EMA 0.995, PGD-10 with step 2/255 at Linf 8/255, TRADES-SE) with the model, batch, loss, dtype and
convolution overridden; `--loss trades-kl` sets the KL divergence, `--loss pgd-at` takes the loss
and attack of configs/cifar10_basic.py:pgd_at-kl (Madry: cross-entropy, uniform start, the attack
in eval mode).
"""

import datetime
import json
import os
import platform
import subprocess
import sys
from typing import Any

import jax
import ml_collections
import numpy as np
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from benchmarks.timing import loadavg, peak_rss_mb, time_calls
from score_jax import config_lib, data, models, train, xla_options
from score_jax.models import layers
from score_jax.setup import Setup

__all__ = [
    "CONV_CHOICES",
    "LOSSES",
    "REPO",
    "bench_setup",
    "cpu_model",
    "device_key",
    "device_peak_mb",
    "flops_of",
    "load_config",
    "loadavg",
    "machine_info",
    "make_config",
    "peak_rss_mb",
    "run_torch",
    "synthetic_dataset",
    "time_calls",
    "torch_spec",
    "write",
]

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LOSSES = ("trades-se", "trades-kl", "pgd-at")
CONV_CHOICES = layers.CONV_IMPLS


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def machine_info() -> dict[str, Any]:
    return {
        "cpu": cpu_model(),
        "cpu_count": os.cpu_count(),
        "backend": jax.default_backend(),
        "devices": [str(d) for d in jax.devices()],
        "device_kind": jax.devices()[0].device_kind,
        "jax": jax.__version__,
        "python": platform.python_version(),
        "xla_flags": os.environ.get("XLA_FLAGS", ""),
        "compiler_options": xla_options.compiler_options(),
        "xla_mem_fraction": os.environ.get("XLA_PYTHON_CLIENT_MEM_FRACTION", ""),
    }


def device_peak_mb() -> float | None:
    """Peak accelerator memory of this process, MiB (None where the backend keeps no stats,
    as on CPU)."""
    stats = jax.devices()[0].memory_stats() or {}
    peak = stats.get("peak_bytes_in_use")
    return None if peak is None else peak / 2**20


def flops_of(cost: Any) -> float:
    """The "flops" entry of a cost analysis (a dict, or a list of one dict in older jax)."""
    if isinstance(cost, list | tuple):
        cost = cost[0] if cost else {}
    return float((cost or {}).get("flops", float("nan")))


def load_config(name: str, variant: str | None = None) -> ml_collections.ConfigDict:
    path = os.path.join(REPO, "configs", name + ".py")
    return config_lib.load_config_file(path, variant)


def make_config(
    model: str,
    batch: int,
    loss: str,
    *,
    dtype: str = "float32",
    conv_impl: str = "auto",
    attack_steps: int = 10,
    eval_steps: int = 20,
) -> ml_collections.ConfigDict:
    """configs/cifar10_ddpm.py with the benchmark's overrides (see the module docstring)."""
    if loss not in LOSSES:
        raise ValueError(f"--loss must be one of {LOSSES}, got {loss!r}")
    c = load_config("cifar10_ddpm")
    if loss == "trades-kl":
        c.loss.divergence = "kl"
    elif loss == "pgd-at":
        basic = load_config("cifar10_basic", "pgd_at-kl")
        c.loss = basic.loss
        c.attack.init = basic.attack.init
    c.model.name = model
    c.model.activation = ""  # the model's default: SiLU for the WRNs, ReLU otherwise
    c.model.conv_impl = conv_impl
    c.model.dtype = dtype
    c.batch_size = batch
    c.eval_batch_size = batch
    c.attack.num_steps = attack_steps
    c.test.pgd.num_steps = eval_steps
    c.dataset.real_fraction = 1.0  # synthetic data only (no generated .npz)
    c.num_train_steps = 1000  # only sets the schedule's shape
    c.progress_bar = False
    return c


def synthetic_dataset(image_size: int, num_train: int, seed: int = 0) -> data.Dataset:
    """A CIFAR-10-shaped in-memory Dataset of random uint8 images and labels."""
    rng = np.random.default_rng(seed)
    shape = (image_size, image_size, 3)

    def split(n: int) -> data.Split:
        return data.Split(
            rng.integers(0, 256, (n, *shape), dtype=np.uint8),
            rng.integers(0, 10, (n,), dtype=np.int32),
        )

    return data.Dataset(
        name="cifar10",
        num_classes=10,
        image_shape=shape,
        mean=layers.CIFAR10_MEAN,
        std=layers.CIFAR10_STD,
        train=split(num_train),
        validation=split(16),
        test=split(16),
    )


def bench_setup(
    config: ml_collections.ConfigDict, dataset: data.Dataset, devices: int = 0
) -> Setup:
    """Training's Setup on `dataset`; `devices` > 0: a mesh over the first `devices` devices
    (default all, as training)."""
    mesh = train.make_mesh(jax.devices()[:devices] if devices > 0 else None)
    return Setup(config, dataset=dataset, mesh=mesh)


def train_setup(args) -> Setup:
    """The Setup of a train-step benchmark's flags (model, batch, loss, dtype, conv_impl,
    attack_steps, image_size, devices) on synthetic data of max(4 batches, 256) images."""
    config = make_config(
        args.model,
        args.batch,
        args.loss,
        dtype=args.dtype,
        conv_impl=args.conv_impl,
        attack_steps=args.attack_steps,
    )
    dataset = synthetic_dataset(args.image_size, max(4 * args.batch, 256))
    return bench_setup(config, dataset, args.devices)


def device_key(setup: Setup) -> jax.Array:
    """The run's base key, replicated on the mesh (the train step's third argument)."""
    return jax.device_put(setup.key, NamedSharding(setup.mesh, P()))


# --- the PyTorch reference (benchmarks/torch_reference.py) ------------------------------------


def torch_spec(
    setup: Setup,
    mode: str,
    steps: int,
    warmup: int,
    breakdown: bool,
    channels_last: bool = False,
) -> dict:
    """The reference's spec of the setup's train (or "eval") step."""
    c = setup.config
    attack = c.test.pgd if mode == "eval" else c.attack
    spec = {
        "mode": mode,
        "model_name": c.model.name,
        "num_classes": setup.info.num_classes,
        "model_kwargs": models.architecture_kwargs(c.model.name, setup.model),
        "steps": steps,
        "warmup": warmup,
        "dtype": c.model.dtype,
        "threads": os.cpu_count(),
        "device": "cuda" if jax.default_backend() == "gpu" else "cpu",
        "seed": c.seed,
        "breakdown": breakdown,
        "channels_last": channels_last,
        "attack": attack.to_dict(),
    }
    if mode == "train":
        spec["loss"] = {"type": c.loss.method, "kind": c.loss.divergence, "beta": c.loss.beta}
        spec["optim"] = {
            k: c.optim[k]
            for k in ("learning_rate", "momentum", "nesterov", "weight_decay")
            + ("weight_decay_batchnorm",)
        }
        spec["ema"] = {"decay": c.ema.decay, "warmup_steps": setup.ema_warmup_steps}
        spec["augment"] = c.augment.to_dict()
    return spec


def run_torch(spec: dict, state: train.TrainState | None, batch: dict, workdir: str) -> dict:
    """Runs benchmarks.torch_reference in a subprocess on `batch` from `state`'s weights."""
    spec = dict(spec)
    spec["batch"] = os.path.join(workdir, "batch.npz")
    np.savez(spec["batch"], image=batch["image"], label=batch["label"])
    spec["state_dict"] = None
    if state is not None:
        import torch

        from score_jax.torch_bridge.convert import export_state_dict

        variables = {"params": state.params, "batch_stats": state.batch_stats}
        spec["state_dict"] = os.path.join(workdir, "state_dict.pt")
        torch.save(export_state_dict(spec["model_name"], variables), spec["state_dict"])
    spec_path, out_path = os.path.join(workdir, "spec.json"), os.path.join(workdir, "torch.json")
    with open(spec_path, "w") as f:
        json.dump(spec, f)
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (REPO, env.get("PYTHONPATH")) if p)
    cmd = [sys.executable, "-m", "benchmarks.torch_reference", "--spec", spec_path]
    proc = subprocess.run(
        [*cmd, "--out", out_path], cwd=REPO, env=env, capture_output=True, text=True
    )
    if proc.returncode != 0:
        raise RuntimeError(f"torch reference failed ({proc.returncode}):\n{proc.stderr[-4000:]}")
    with open(out_path) as f:
        return json.load(f)


def result_header(benchmark: str, args: Any, **extra: Any) -> dict[str, Any]:
    """The fields every benchmark's JSON starts with: its name, date, time, machine, flags."""
    return {
        "benchmark": benchmark,
        "date": datetime.date.today().isoformat(),
        "measured_at": datetime.datetime.now().isoformat(timespec="seconds"),
        "machine": machine_info(),
        **extra,
        "args": vars(args),
    }


def write(result: dict, path: str) -> None:
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w") as f:
        json.dump(result, f, indent=2, default=float)
