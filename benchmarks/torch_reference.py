"""Eager PyTorch reference of the SCORE train step and of the PGD evaluation: the baseline of the
benchmarks, written from the same formulas as score_jax (DESIGN.md section 2) in the style of the
reference PyTorch code (a Python loop of PGD steps, `track_bn_stats(model, False)` during the
TRADES attack, eval mode during the PGD-AT attack, SGD + an EMA copy updated after each step).

Run in its own process by benchmarks/train_step.py and benchmarks/eval.py (own threads, own peak
memory), from a JSON spec they write:

    python -m benchmarks.torch_reference --spec SPEC.json --out OUT.json

SPEC keys: mode ("train" | "eval"), model_name, num_classes, model_kwargs (build_torch_model's),
state_dict (a torch.save'd state dict, or null for PyTorch's own init), batch (an .npz with
`image` uint8 NHWC and `label`), steps, warmup, dtype ("float32" | "bfloat16"), threads (null:
os.cpu_count()), device (null: "cpu"; or "cuda"), channels_last (NHWC memory layout; default
false, the reference's NCHW), compile (default false: `torch.compile` of the model, its forward
and, through AOTAutograd, its backward; the attack loop and the optimizer stay eager, as a user
adding one line would have it), compile_backend (default "inductor"; "aot_eager" traces and
partitions without generating code), seed, breakdown, profile, attack
{eps, step_size, num_steps, init, norm[, objective]}; train mode also loss {type, kind, beta},
optim {learning_rate, momentum, nesterov, weight_decay, weight_decay_batchnorm}, ema {decay,
warmup_steps}, augment {crop_padding, flip}.
Only the Linf threat model is implemented (the benchmarks' setting).
"""

import argparse
import contextlib
import json
import os
import statistics
import sys
import time
from collections.abc import Callable

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from benchmarks.timing import loadavg, peak_rss_mb, time_calls


def divergence_from_logits(p: torch.Tensor, logits: torch.Tensor, kind: str) -> torch.Tensor:
    """D(p || softmax(logits)) per example: SE = sum (p - q)^2; KL = sum p log p - p log_softmax."""
    logits = logits.float()
    if kind == "se":
        return (p - F.softmax(logits, dim=-1)).square().sum(-1)
    if kind == "kl":
        return (torch.special.xlogy(p, p) - p * F.log_softmax(logits, dim=-1)).sum(-1)
    raise ValueError(f"torch reference: divergence {kind!r} not implemented (se, kl)")


def cw_margin(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    logits = logits.float()
    onehot = F.one_hot(labels, logits.shape[-1]).bool()
    true = logits.masked_fill(~onehot, 0.0).sum(-1)
    other = logits.masked_fill(onehot, float("-inf")).amax(-1)
    return other - true


def track_bn_stats(model: nn.Module, track: bool) -> None:
    """The reference's switch: False = batch statistics without updating the running averages."""
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.track_running_stats = track


def augment(x: torch.Tensor, gen: torch.Generator, crop_padding: int, flip: bool) -> torch.Tensor:
    """Per-example random crop of the zero-padded image and horizontal flip (p = 0.5), NCHW."""
    b, _, h, w = x.shape
    if crop_padding > 0:
        p = crop_padding
        padded = F.pad(x, (p, p, p, p))
        off = torch.randint(0, 2 * p + 1, (b, 2), generator=gen).tolist()
        x = torch.stack([padded[i, :, dy : dy + h, dx : dx + w] for i, (dy, dx) in enumerate(off)])
    if flip:
        mask = (torch.rand(b, generator=gen) < 0.5).view(b, 1, 1, 1).to(x.device)
        x = torch.where(mask, x.flip(3), x)
    return x


class Reference:
    """The eager step: attack (Python loop), loss, SGD, EMA; and the PGD evaluation step."""

    def __init__(self, model: nn.Module, spec: dict):
        if spec["attack"].get("norm", "linf") != "linf":
            raise ValueError("torch reference: only the linf attack is implemented")
        self.model = model
        # The mode switches (train/eval, track_running_stats) act on `model`; the forward passes
        # go through `forward`, compiled when the spec says so (one graph per mode, guarded).
        self.forward: Callable[[torch.Tensor], torch.Tensor] = model
        if spec.get("compile"):
            self.forward = torch.compile(model, backend=spec.get("compile_backend") or "inductor")
        self.spec = spec
        self.bf16 = spec.get("dtype", "float32") == "bfloat16"
        self.device = torch.device(spec.get("device") or "cpu")
        self.gen = torch.Generator().manual_seed(int(spec.get("seed", 0)))
        self.num_classes = int(spec["num_classes"])
        self.steps_done = 0
        if spec["mode"] == "train":
            o = spec["optim"]
            bn_params = {
                id(p)
                for m in model.modules()
                if isinstance(m, nn.modules.batchnorm._BatchNorm)
                for p in m.parameters(recurse=False)
            }
            decay = [p for p in model.parameters() if id(p) not in bn_params]
            no_decay = [p for p in model.parameters() if id(p) in bn_params]
            wd = float(o["weight_decay"])
            groups = [
                {"params": decay, "weight_decay": wd},
                {"params": no_decay, "weight_decay": wd if o["weight_decay_batchnorm"] else 0.0},
            ]
            self.opt = torch.optim.SGD(
                groups,
                lr=float(o["learning_rate"]),
                momentum=float(o["momentum"]),
                nesterov=bool(o["nesterov"]),
            )
            self.params = [p for p in model.parameters()]
            self.ema = [p.detach().clone() for p in self.params]

    def autocast(self):
        if self.bf16:
            return torch.autocast(self.device.type, dtype=torch.bfloat16)
        return contextlib.nullcontext()

    def sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize()

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        with self.autocast():
            return self.forward(x).float()

    def prepare(self, images: torch.Tensor, train: bool) -> torch.Tensor:
        x = images.float().div_(255.0)
        if train:
            a = self.spec["augment"]
            x = augment(x, self.gen, int(a["crop_padding"]), bool(a["flip"]))
        return x

    def _random(self, fn, x: torch.Tensor) -> torch.Tensor:
        """fn(shape, generator=self.gen) drawn on the host generator, moved to x's device."""
        return fn(x.shape, generator=self.gen).to(x.device)

    def _init_delta(self, x: torch.Tensor, init: str, eps: float) -> torch.Tensor:
        if init == "normal":
            return 0.001 * self._random(torch.randn, x)
        if init == "uniform":
            return (self._random(torch.rand, x) * 2 - 1) * eps
        return torch.zeros_like(x)

    def pgd(self, objective: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor):
        """Linf PGD maximising objective(x_adv).sum(): sign steps, projection, box [0, 1]."""
        a = self.spec["attack"]
        eps, step = float(a["eps"]), float(a["step_size"])
        x_adv = x + self._init_delta(x, a["init"], eps)
        x_adv = torch.min(torch.max(x_adv, x - eps), x + eps).clamp(0.0, 1.0).detach()
        for _ in range(int(a["num_steps"])):
            x_adv = self.pgd_iteration(objective, x, x_adv, eps, step)
        return x_adv

    def pgd_iteration(self, objective, x, x_adv, eps, step):
        x_adv.requires_grad_(True)
        with torch.enable_grad():
            value = objective(x_adv).sum()
        (grad,) = torch.autograd.grad(value, [x_adv])
        x_adv = x_adv.detach() + step * grad.sign()
        return torch.min(torch.max(x_adv, x - eps), x + eps).clamp(0.0, 1.0).detach()

    # --- training ---------------------------------------------------------------------------

    def attack_objective(self, x: torch.Tensor, labels: torch.Tensor):
        """The attack's per-example objective, with the model in the attack's mode."""
        lc = self.spec["loss"]
        if lc["type"] == "trades":
            self.model.train()
            track_bn_stats(self.model, False)
            with torch.no_grad():
                p_nat = F.softmax(self.logits(x), dim=-1)
            return lambda xa: divergence_from_logits(p_nat, self.logits(xa), lc["kind"])
        self.model.eval()
        target = F.one_hot(labels.long(), self.num_classes).float()
        return lambda xa: divergence_from_logits(target, self.logits(xa), lc["kind"])

    def end_attack(self) -> None:
        self.model.train()
        track_bn_stats(self.model, True)

    def loss(self, x: torch.Tensor, x_adv: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        lc = self.spec["loss"]
        target = F.one_hot(labels.long(), self.num_classes).float()
        if lc["type"] == "trades":
            logits_nat = self.logits(x)
            logits_adv = self.logits(x_adv)
            natural = divergence_from_logits(target, logits_nat, lc["kind"])
            robust = divergence_from_logits(F.softmax(logits_nat, dim=-1), logits_adv, lc["kind"])
            return (natural + float(lc["beta"]) * robust).mean()
        return divergence_from_logits(target, self.logits(x_adv), lc["kind"]).mean()

    def ema_decay(self) -> float:
        e = self.spec["ema"]
        d = self.steps_done - int(e["warmup_steps"])  # steps_done = the new step count
        return 0.0 if d < 0 else min(float(e["decay"]), (1.0 + d) / (10.0 + d))

    def update(self) -> None:
        self.opt.step()
        self.steps_done += 1
        decay = self.ema_decay()
        with torch.no_grad():
            torch._foreach_mul_(self.ema, decay)
            torch._foreach_add_(self.ema, [p.detach() for p in self.params], alpha=1.0 - decay)

    def train_step(self, images: torch.Tensor, labels: torch.Tensor) -> float:
        x = self.prepare(images, train=True)
        objective = self.attack_objective(x, labels)
        x_adv = self.pgd(objective, x)
        self.end_attack()
        self.opt.zero_grad(set_to_none=True)
        loss = self.loss(x, x_adv, labels)
        loss.backward()
        self.update()
        return float(loss.detach())

    # --- evaluation -------------------------------------------------------------------------

    def eval_step(self, images: torch.Tensor, labels: torch.Tensor) -> tuple[int, int]:
        """(correct clean, correct under PGD) on this batch, model in eval mode."""
        self.model.eval()
        x = self.prepare(images, train=False)
        with torch.no_grad():
            clean = (self.logits(x).argmax(-1) == labels).sum()
        if self.spec["attack"].get("objective", "ce") == "cw":
            objective = lambda xa: cw_margin(self.logits(xa), labels)  # noqa: E731
        else:
            target = F.one_hot(labels.long(), self.num_classes).float()
            objective = lambda xa: divergence_from_logits(target, self.logits(xa), "kl")  # noqa: E731
        x_adv = self.pgd(objective, x)
        with torch.no_grad():
            adv = (self.logits(x_adv).argmax(-1) == labels).sum()
        return int(clean), int(adv)

    # --- where the time goes ----------------------------------------------------------------

    def breakdown(self, images, labels, steps: int, warmup: int) -> dict[str, float]:
        """Median ms of the step's parts: forward (the attack's mode, and eval mode), one attack
        iteration, loss forward + backward (no update), optimizer + EMA update."""
        x = self.prepare(images, train=True)
        objective = self.attack_objective(x, labels)
        a = self.spec["attack"]
        eps, step = float(a["eps"]), float(a["step_size"])
        x_adv = torch.min(torch.max(x + self._init_delta(x, a["init"], eps), x - eps), x + eps)
        x_adv = x_adv.clamp(0.0, 1.0).detach()

        def forward():
            with torch.no_grad():
                self.logits(x)
            self.sync()

        def attack_iteration():
            self.pgd_iteration(objective, x, x_adv, eps, step)
            self.sync()

        out = {
            "forward_ms": forward,
            "attack_iteration_ms": attack_iteration,
        }
        res = {k: 1e3 * statistics.median(time_calls(f, steps, warmup)) for k, f in out.items()}
        self.model.eval()
        res["forward_eval_mode_ms"] = 1e3 * statistics.median(time_calls(forward, steps, warmup))
        self.end_attack()

        def loss_grad():
            self.opt.zero_grad(set_to_none=True)
            self.loss(x, x_adv, labels).backward()
            self.sync()

        def update():
            self.update()
            self.sync()

        res["loss_grad_ms"] = 1e3 * statistics.median(time_calls(loss_grad, steps, warmup))
        res["update_ema_ms"] = 1e3 * statistics.median(time_calls(update, steps, warmup))
        return res


def _op_kind(key: str) -> str:
    k = key.lower()
    if "convolution_backward" in k:
        return "convolution backward"
    if "conv" in k:
        return "convolution forward"
    if "batch_norm" in k and "backward" in k:
        return "batchnorm backward"
    if "batch_norm" in k:
        return "batchnorm forward"
    if any(w in k for w in ("mm", "addmm", "linear", "matmul")):
        return "dot"
    if any(w in k for w in ("copy", "cat", "pad", "stack", "slice", "index", "clone", "flip")):
        return "data movement"
    return "other"


def profile(call: Callable[[], object], top: int = 12) -> dict:
    """One call under torch.profiler: self CPU ms per aten op, summed by kind."""
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile

    with torch_profile(activities=[ProfilerActivity.CPU]) as prof:
        t0 = time.perf_counter()
        call()
        wall = time.perf_counter() - t0
    rows = [(e.key, e.self_cpu_time_total / 1e3) for e in prof.key_averages()]
    rows = [(k, ms) for k, ms in rows if k.startswith("aten::")]
    by_kind: dict[str, float] = {}
    for k, ms in rows:
        by_kind[_op_kind(k)] = by_kind.get(_op_kind(k), 0.0) + ms
    total = sum(by_kind.values()) or 1.0
    return {
        "traced_step_ms": 1e3 * wall,
        "op_ms_total": sum(by_kind.values()),
        "by_kind": {
            k: {"ms": round(v, 3), "pct": round(100 * v / total, 2)}
            for k, v in sorted(by_kind.items(), key=lambda kv: -kv[1])
        },
        "top_ops": [
            {"name": k, "ms": round(ms, 3)} for k, ms in sorted(rows, key=lambda r: -r[1])[:top]
        ],
    }


def framework(spec: dict) -> str:
    """How the spec runs PyTorch: "torch 2.13.0 compile(inductor) channels_last bf16-autocast
    (cuda)", "torch 2.13.0 eager (cpu)", ..."""
    how = "eager"
    if spec.get("compile"):
        how = f"compile({spec.get('compile_backend') or 'inductor'})"
    if spec.get("channels_last"):
        how += " channels_last"
    if spec.get("dtype", "float32") == "bfloat16":
        how += " bf16-autocast"
    return f"torch {torch.__version__} {how} ({torch.device(spec.get('device') or 'cpu').type})"


def build(
    spec: dict, state_dict: dict | None, image: np.ndarray, label: np.ndarray
) -> tuple[Reference, torch.Tensor, torch.Tensor]:
    """The spec's Reference (model from `state_dict`, or PyTorch's init if None; on the spec's
    device and memory layout) and the batch (`image` uint8 NHWC) as its tensors."""
    from score_jax.torch_bridge.models import build_torch_model

    device = torch.device(spec.get("device") or "cpu")
    if device.type == "cuda":
        # cuDNN's algorithm search for the fixed shapes, as GPU training scripts switch it on.
        torch.backends.cudnn.benchmark = True
    model = build_torch_model(spec["model_name"], int(spec["num_classes"]), **spec["model_kwargs"])
    if state_dict is not None:
        model.load_state_dict(state_dict, strict=True)
    layout = torch.channels_last if spec.get("channels_last") else torch.contiguous_format
    model.to(device, memory_format=layout)
    images = torch.from_numpy(np.ascontiguousarray(image.transpose(0, 3, 1, 2)))
    labels = torch.from_numpy(label.astype(np.int64))
    images, labels = images.to(device).contiguous(memory_format=layout), labels.to(device)
    return Reference(model, spec), images, labels


def run(spec: dict) -> dict:
    """Builds the model from the spec, times `steps` steps (median), returns the results."""
    threads = int(spec.get("threads") or os.cpu_count() or 1)
    torch.set_num_threads(threads)
    torch.manual_seed(int(spec.get("seed", 0)))
    device = torch.device(spec.get("device") or "cpu")
    state_dict = torch.load(spec["state_dict"]) if spec.get("state_dict") else None
    with np.load(spec["batch"]) as batch:
        ref, images, labels = build(spec, state_dict, batch["image"], batch["label"])
    fn = ref.train_step if spec["mode"] == "train" else ref.eval_step
    first_call_s = None
    if spec.get("compile"):  # compiles every mode's graphs: timed apart, never as a step
        t0 = time.perf_counter()
        fn(images, labels)
        ref.sync()
        first_call_s = time.perf_counter() - t0
    load_before = loadavg()
    cpu: list[float] = []
    times = time_calls(lambda: fn(images, labels), int(spec["steps"]), int(spec["warmup"]), cpu)
    median = statistics.median(times)
    result = {
        "framework": framework(spec),
        "channels_last": bool(spec.get("channels_last")),
        "compile": bool(spec.get("compile")),
        "compile_first_call_s": first_call_s,
        "threads": threads,
        "step_s_all": times,
        "step_s_median": median,
        "step_cpu_s_all": cpu,
        "step_cpu_s_median": statistics.median(cpu),
        "images_per_s": images.shape[0] / median,
        "loadavg_before": load_before,
        "loadavg_after": loadavg(),
    }
    if spec.get("profile"):
        result["profile"] = profile(lambda: fn(images, labels))
    if spec.get("breakdown") and spec["mode"] == "train":
        result["breakdown"] = ref.breakdown(images, labels, int(spec["steps"]), 1)
    result["peak_rss_mb"] = peak_rss_mb()
    if device.type == "cuda":
        result["device_peak_mb"] = torch.cuda.max_memory_allocated(device) / 2**20
    return result


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--spec", required=True, help="JSON spec (see the module docstring)")
    parser.add_argument("--out", required=True, help="where to write the results JSON")
    args = parser.parse_args(argv)
    with open(args.spec) as f:
        spec = json.load(f)
    result = run(spec)
    with open(args.out, "w") as f:
        json.dump(result, f, indent=2)
    return result


if __name__ == "__main__":
    main(sys.argv[1:])
