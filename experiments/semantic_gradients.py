"""Semantic input gradients of a robust and an undefended model (the paper's Section 4.2,
Figures 4 and 5; Appendix D.2).

For test images x with labels y and f = the logits (eval mode, EMA parameters), three input
gradients, reading the classifier as an energy-based model (Grathwohl et al., 2020):

    grad_x log p(y|x)                    (= -grad_x cross-entropy)
    grad_x log p(x, y) = grad_x f(x)[y]
    -grad_x log p(x)   = -grad_x logsumexp_y' f(x)[y']

Each is summed over channels per pixel position; the top 10% of positions by absolute value are
the pixels that affect the objective most (the paper's plots). A simple semantic-ness number per
model and map: the fraction of those top-10% pixels that lie on the digit strokes (input
intensity > 0.3), averaged over test images (chance level: the mean stroke fraction, also
reported), and the mean Pearson correlation of the signed map with the image.

    python experiments/semantic_gradients.py --workdir /tmp/qs_robust \
        --undefended_workdir /tmp/qs_undef --out /tmp/semantic [--num_images 6]

Writes DIR/semantic_gradients.png (rows: images; columns: input, the 3 maps of the robust model,
the 3 maps of the undefended one; top-10% pixels in red over the dimmed input) and
DIR/results.json.
"""

from __future__ import annotations

import argparse
import math
import os
import time
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from score_jax import losses

try:
    from experiments import common
except ImportError:  # run as a script: python experiments/semantic_gradients.py
    import common

MAPS = ("grad_log_p_y_given_x", "grad_log_p_x_y", "neg_grad_log_p_x")
MAP_TITLES = {
    "grad_log_p_y_given_x": "∇ log p(y|x)",
    "grad_log_p_x_y": "∇ log p(x,y)",
    "neg_grad_log_p_x": "−∇ log p(x)",
}
TOP_FRACTION = 0.1
STROKE_THRESHOLD = 0.3


def _objectives(logits: jax.Array, labels: jax.Array) -> dict[str, jax.Array]:
    """Per-example log p(y|x), log p(x,y) + log Z and -(log p(x) + log Z) from the logits."""
    return {
        "grad_log_p_y_given_x": -losses.pgd_at_per_example(logits, labels, kind="kl"),
        "grad_log_p_x_y": jnp.take_along_axis(logits, labels[:, None], axis=1)[:, 0],
        "neg_grad_log_p_x": -jax.nn.logsumexp(logits, axis=1),
    }


def gradient_maps(restored: common.Restored, x: np.ndarray, labels: np.ndarray) -> dict:
    """{map name: (N, H, W) channel-summed input gradient} (eval mode: examples independent)."""

    @jax.jit
    def grads(x: jax.Array, labels: jax.Array) -> dict[str, jax.Array]:
        def total(name: str):
            return lambda x: jnp.sum(_objectives(restored.logits_fn(x), labels)[name])

        return {name: jnp.sum(jax.grad(total(name))(x), axis=-1) for name in MAPS}

    return jax.device_get(grads(jnp.asarray(x), jnp.asarray(labels)))


def top_mask(score: np.ndarray, fraction: float = TOP_FRACTION) -> np.ndarray:
    """(N, H, W) bool: the ceil(fraction H W) positions of largest |score| per image."""
    n = score.shape[0]
    flat = np.abs(score.reshape(n, -1))
    k = max(1, math.ceil(fraction * flat.shape[1]))
    idx = np.argsort(-flat, axis=1, kind="stable")[:, :k]
    mask = np.zeros_like(flat, dtype=bool)
    np.put_along_axis(mask, idx, True, axis=1)
    return mask.reshape(score.shape)


def semantic_scores(maps: dict, images: np.ndarray) -> dict[str, dict[str, float]]:
    """Per map: mean fraction of top-10% pixels on strokes, and mean correlation with the image."""
    intensity = images.mean(axis=-1)
    stroke = intensity > STROKE_THRESHOLD
    out = {}
    for name, g in maps.items():
        mask = top_mask(g)
        on = (mask & stroke).sum(axis=(1, 2)) / mask.sum(axis=(1, 2))
        a = g.reshape(len(g), -1) - g.reshape(len(g), -1).mean(1, keepdims=True)
        b = intensity.reshape(len(g), -1) - intensity.reshape(len(g), -1).mean(1, keepdims=True)
        denom = np.maximum(np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1), 1e-12)
        out[name] = {
            "top10_on_stroke": float(on.mean()),
            "corr_with_image": float(((a * b).sum(1) / denom).mean()),
        }
    return out


def pick_images(labels: np.ndarray, num_images: int) -> np.ndarray:
    """Indices of the first test image of class 0, 1, 2, ... (cycling), `num_images` of them."""
    classes = np.unique(labels)
    chosen: list[int] = []
    for r in range(len(labels)):
        for c in classes:
            hits = np.flatnonzero(labels == c)
            if r < len(hits) and len(chosen) < num_images:
                chosen.append(int(hits[r]))
        if len(chosen) >= num_images:
            break
    return np.asarray(chosen)


def plot(path: str, images: np.ndarray, panels: dict, row_labels: list[str]) -> None:
    """Grid: one row per image; the input, then each model's maps (top-10% pixels in red)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    columns = [("input", None, None)] + [
        (m, name, MAP_TITLES[name]) for m in panels for name in MAPS
    ]
    n = len(images)
    fig, axes = plt.subplots(n, len(columns), figsize=(1.35 * len(columns), 1.45 * n + 0.5))
    axes = np.atleast_2d(axes)
    grey = images.mean(axis=-1)
    for i in range(n):
        for j, (model, name, title) in enumerate(columns):
            ax = axes[i, j]
            if model == "input":
                ax.imshow(grey[i], cmap="gray", vmin=0, vmax=1, interpolation="nearest")
                ax.set_ylabel(row_labels[i], fontsize=7)
            else:
                rgb = np.repeat(0.35 * grey[i][..., None], 3, axis=-1)
                rgb[panels[model][name][i]] = (1.0, 0.1, 0.1)
                ax.imshow(rgb, interpolation="nearest")
            if i == 0:
                ax.set_title("input" if model == "input" else f"{model}\n{title}", fontsize=7)
            ax.set_xticks([])
            ax.set_yticks([])
    fig.suptitle("top-10% pixels of |channel-summed input gradient| (red)", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=130)
    plt.close(fig)


def run(
    workdir: str,
    undefended_workdir: str,
    out: str,
    *,
    num_images: int = 6,
    num_examples: int | None = None,
    undefended_checkpoint: str = "last",
) -> dict:
    """Both models' maps and scores; writes out/semantic_gradients.png and out/results.json.

    The robust model: its best checkpoint (else the last); the undefended one: by default its
    last checkpoint, since a best-by-PGD-accuracy selection picks an arbitrary early one there.
    """
    start = time.perf_counter()
    models = {
        "robust": common.load_workdir(workdir),
        "undefended": common.load_workdir(undefended_workdir, which=undefended_checkpoint),
    }
    test = models["robust"].setup.dataset.test
    n = len(test) if not num_examples or num_examples < 0 else min(num_examples, len(test))
    images = np.asarray(test.images[:n], np.float32) / 255.0
    labels = np.asarray(test.labels[:n], np.int32)
    stroke = images.mean(axis=-1) > STROKE_THRESHOLD
    shown = pick_images(labels, num_images)
    results: dict = {
        "maps": list(MAPS),
        "num_examples": n,
        "top_fraction": TOP_FRACTION,
        "top_pixels_per_image": int(math.ceil(TOP_FRACTION * stroke[0].size)),
        "stroke_threshold": STROKE_THRESHOLD,
        "chance_on_stroke": float(stroke.mean()),
        "shown_test_indices": shown.tolist(),
        "models": {},
    }
    panels, preds = {}, {}
    for key, restored in models.items():
        maps = gradient_maps(restored, images, labels)
        logits = np.asarray(jax.jit(restored.logits_fn)(jnp.asarray(images)))
        preds[key] = logits.argmax(1)
        results["models"][key] = {
            "workdir": os.path.abspath(restored.setup.workdir),
            "checkpoint": restored.checkpoint,
            "step": restored.step,
            "clean_accuracy": float((preds[key] == labels).mean()),
            **semantic_scores(maps, images),
        }
        panels[key] = {name: top_mask(maps[name][shown]) for name in MAPS}
    row_labels = [f"y={labels[i]} R:{preds['robust'][i]} U:{preds['undefended'][i]}" for i in shown]
    os.makedirs(out, exist_ok=True)
    plot(os.path.join(out, "semantic_gradients.png"), images[shown], panels, row_labels)
    results["seconds"] = round(time.perf_counter() - start, 1)
    common.write_json(os.path.join(out, "results.json"), results)
    return results


def main(argv: Sequence[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--workdir", required=True, help="the trained robust model's workdir")
    p.add_argument("--undefended_workdir", required=True, help="an undefended model's workdir")
    p.add_argument("--out", required=True, help="output directory")
    p.add_argument("--num_images", type=int, default=6, help="rows of the image grid")
    p.add_argument("--num_examples", type=int, default=None, help="scores over the first N tests")
    p.add_argument(
        "--undefended_checkpoint",
        choices=("last", "auto"),
        default="last",
        help="the undefended run's checkpoint: last (default) or auto (best, else last)",
    )
    args = p.parse_args(argv)
    r = run(
        args.workdir,
        args.undefended_workdir,
        args.out,
        num_images=args.num_images,
        num_examples=args.num_examples,
        undefended_checkpoint=args.undefended_checkpoint,
    )
    print(
        f"top-10% pixels on strokes (chance {r['chance_on_stroke']:.3f}) | correlation with image"
    )
    for key, m in r["models"].items():
        for name in MAPS:
            print(
                f"{key:<11}{name:<22}{m[name]['top10_on_stroke']:8.3f}"
                f"{m[name]['corr_with_image']:9.3f}"
            )
    print(f"{r['seconds']} s; written to {args.out}")
    return r


if __name__ == "__main__":
    main()
