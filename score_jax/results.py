"""Results across runs: `python -m score_jax.results WORKDIR... [--csv PATH] [--plots DIR]`.

Prints one markdown table with a row per workdir: the config fields that differ between the runs
(config.json), the final step, every number in results.json and autoattack.json (columns
`results:<key>`, `autoattack:<key>`; nested dicts flattened to dotted keys, so any shape of those
files works) and the wall time (`wall_s`: from the start of each training session's TensorBoard
log to its last event, summed over resumed sessions). `--csv` writes the same table at full
precision; `--plots` writes one PNG per group of metrics.jsonl keys (train loss, train accuracy,
validation, test, learning rate, momentum, other), a panel per key and a line per run; it needs
matplotlib (`pip install -e ".[plots]"`).

A workdir may be local or on gs:// (any `score_jax.workdir_io` path); a gs:// argument with
`*`, `?` or `[` is expanded here (the shell cannot): `python -m score_jax.results
'gs://bucket/runs/*' runs/*` lists the bucket's runs beside the local ones.

A workdir with a missing config.json or a corrupt file is skipped with a warning naming the file;
no usable workdir at all is an error.
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
import glob
import json
import math
import os
import struct
import sys
from collections.abc import Callable, Sequence
from typing import Any

from score_jax import workdir_io
from score_jax.errors import DataError

CONFIG_FILE = "config.json"
RESULTS_FILE = "results.json"  # trainer.RESULTS_FILE (not imported: it would import jax)
AUTOATTACK_FILE = "autoattack.json"
# Result columns are named "<file stem>:<dotted key>", apart from the config fields' columns.
RESULT_PREFIXES = {RESULTS_FILE: "results:", AUTOATTACK_FILE: "autoattack:"}
METRICS_FILE = "metrics.jsonl"
# Ordered: a metrics key goes to the first group whose rule it matches.
PLOT_GROUPS: tuple[tuple[str, Callable[[str], bool]], ...] = (
    ("learning_rate", lambda k: k.endswith("learning_rate")),
    ("momentum", lambda k: k.endswith("momentum")),
    ("train_accuracy", lambda k: k.startswith("train/") and "accuracy" in k),
    ("validation", lambda k: k.startswith("val/")),
    ("test", lambda k: k.startswith("test/")),
    ("train_loss", lambda k: k in ("train/loss", "train/natural", "train/robust") or "loss" in k),
    ("other", lambda k: True),
)
_NOT_PLOTTED = ("step", "train/epoch")


@dataclasses.dataclass
class Run:
    """One workdir: its flattened config, its numeric results and its metrics.jsonl rows."""

    workdir: str
    config: dict[str, Any]
    results: dict[str, float]
    metrics: list[dict[str, Any]]
    wall_s: float | None = None

    @property
    def step(self) -> int | None:
        if "results:step" in self.results:
            return int(self.results["results:step"])
        steps = [row["step"] for row in self.metrics if "step" in row]
        return int(max(steps)) if steps else None


def flatten(tree: Any, prefix: str = "") -> dict[str, Any]:
    """{"a": {"b": 1}} -> {"a.b": 1}; every non-dict value is a leaf."""
    if not isinstance(tree, dict):
        return {prefix: tree}
    out = {}
    for k, v in tree.items():
        out.update(flatten(v, f"{prefix}.{k}" if prefix else str(k)))
    return out


def _is_number(v: Any) -> bool:
    return isinstance(v, int | float) and not isinstance(v, bool)


def _join(workdir: str, *parts: str) -> str:
    if workdir_io.is_remote(workdir):
        return os.fspath(workdir_io.join(workdir, *parts))
    return os.path.join(workdir, *parts)


def _exists(path: str) -> bool:
    return workdir_io.exists(path) if workdir_io.is_remote(path) else os.path.exists(path)


def _open(path: str, mode: str = "r"):
    return workdir_io.open_read(path, mode) if workdir_io.is_remote(path) else open(path, mode)


def expand(patterns: Sequence[str]) -> list[str]:
    """The workdirs the arguments name: a remote one with glob characters becomes its matches
    (sorted; none is kept as given, so that it is reported as missing); the others as given."""
    out = []
    for pattern in patterns:
        if workdir_io.is_remote(pattern) and glob.has_magic(pattern):
            fs = workdir_io._fs(pattern)
            matches = sorted(fs.unstrip_protocol(m) for m in fs.glob(pattern.rstrip("/")))
            out.extend(matches or [pattern])
        else:
            out.append(pattern)
    return out


def _read_json(path: str) -> Any:
    try:
        with _open(path, "rb") as f:
            return json.loads(f.read().decode("utf-8"))
    except UnicodeDecodeError as e:
        raise DataError(f"{path}: not UTF-8 text (byte {e.start})") from None
    except json.JSONDecodeError as e:
        raise DataError(f"{path}: not valid JSON ({e.msg} at line {e.lineno})") from None
    except OSError as e:
        raise DataError(f"{path}: {e.strerror or e}") from None


def _read_metrics(path: str) -> list[dict[str, Any]]:
    rows = []
    try:
        f = _open(path, "rb")  # bytes: a binary-corrupt line is reported like a text-corrupt one
    except OSError as e:
        raise DataError(f"{path}: {e.strerror or e}") from None
    with f:
        for lineno, raw in enumerate(f, 1):
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError:
                raise DataError(f"{path}:{lineno}: not UTF-8 text ({raw[:20]!r})") from None
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise DataError(f"{path}:{lineno}: not valid JSON ({e.msg})") from None
            if not isinstance(row, dict):
                raise DataError(f"{path}:{lineno}: expected a JSON object")
            rows.append(row)
    return rows


def _event_wall_times(path: str) -> tuple[float, float] | None:
    """(first, last) wall time of a TensorBoard event file; None if it holds no event. Reads
    the TFRecord framing (length, crc, data, crc) and parses only those two events."""
    from tensorboardX.proto.event_pb2 import Event

    first = last = None
    with _open(path, "rb") as f:
        while True:
            header = f.read(12)
            if len(header) < 12:
                break
            (length,) = struct.unpack("<Q", header[:8])
            data = f.read(length)
            if len(data) < length or len(f.read(4)) < 4:
                break  # a record cut short by a killed writer
            if first is None:
                first = data
            last = data
    if first is None:
        return None
    try:
        return Event.FromString(first).wall_time, Event.FromString(last).wall_time
    except Exception as e:  # protobuf's DecodeError
        raise DataError(f"{path}: not a TensorBoard event file ({e})") from None


def _wall_seconds(workdir: str) -> float | None:
    if workdir_io.is_remote(workdir):
        folder = _join(workdir, "tensorboard")
        names = [n for n in workdir_io.listdir(folder) if n.startswith("events.out.tfevents.")]
        paths = [_join(folder, n) for n in names]
    else:
        paths = sorted(glob.glob(os.path.join(workdir, "tensorboard", "events.out.tfevents.*")))
    spans = [_event_wall_times(p) for p in paths]
    spans = [s for s in spans if s is not None]
    return sum(last - first for first, last in spans) if spans else None


def load_run(workdir: str) -> Run:
    """Reads one workdir; raises DataError naming the file that is missing or corrupt."""
    config_path = _join(workdir, CONFIG_FILE)
    if not _exists(config_path):
        raise DataError(f"{config_path}: missing (not a score_jax workdir?)")
    config = _read_json(config_path)
    if not isinstance(config, dict):
        raise DataError(f"{config_path}: expected a JSON object")
    results: dict[str, float] = {}
    for name, column_prefix in RESULT_PREFIXES.items():
        path = _join(workdir, name)
        if _exists(path):
            tree = _read_json(path)
            if not isinstance(tree, dict):
                raise DataError(f"{path}: expected a JSON object, got a {type(tree).__name__}")
            flat = flatten(tree)
            results.update({column_prefix + k: v for k, v in flat.items() if _is_number(v)})
    metrics_path = _join(workdir, METRICS_FILE)
    metrics = _read_metrics(metrics_path) if _exists(metrics_path) else []
    return Run(workdir, flatten(config), results, metrics, _wall_seconds(workdir))


def load_runs(workdirs: Sequence[str], warn: Callable[[str], None]) -> list[Run]:
    """The usable workdirs; each unusable one is reported through `warn` and skipped."""
    runs = []
    for workdir in workdirs:
        try:
            runs.append(load_run(workdir.rstrip("/") or workdir))
        except DataError as e:
            warn(f"{e}; skipped {workdir}")
    if not runs:
        raise DataError(f"no usable workdir among the {len(workdirs)} given")
    return runs


def _key(value: Any) -> str:
    return json.dumps(value, sort_keys=True)


def table(runs: Sequence[Run]) -> tuple[list[str], list[list[Any]]]:
    """Columns and rows: run, the config fields whose values differ, step, the numbers of
    results.json ("results:<key>") and autoattack.json ("autoattack:<key>"), wall_s.

    A field missing from a run counts as a value of its own; a missing cell is None."""
    fields = sorted({k for r in runs for k in r.config})
    differing = [f for f in fields if len({_key(r.config.get(f)) for r in runs}) > 1]
    prefixes = list(RESULT_PREFIXES.values())
    numbers = sorted(
        {k for r in runs for k in r.results if k != "results:step"},
        key=lambda k: (prefixes.index(k[: k.index(":") + 1]), k),
    )
    has_wall = any(r.wall_s is not None for r in runs)
    columns = ["run", *differing, "step", *numbers] + (["wall_s"] if has_wall else [])
    rows = []
    for r in runs:
        row = [r.workdir, *(r.config.get(f) for f in differing), r.step]
        row += [r.results.get(k) for k in numbers]
        rows.append(row + ([r.wall_s] if has_wall else []))
    return columns, rows


def _cell(value: Any, precise: bool) -> str:
    if value is None:
        return ""
    if isinstance(value, float):
        return repr(value) if precise or not math.isfinite(value) else f"{value:.4g}"
    if isinstance(value, str):
        return value
    return json.dumps(value)


def markdown(columns: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    def line(cells):
        return "| " + " | ".join(str(c).replace("|", "\\|") for c in cells) + " |"

    out = [line(columns), "|" + "---|" * len(columns)]
    out += [line(_cell(v, precise=False) for v in row) for row in rows]
    return "\n".join(out)


def write_csv(path: str, columns: Sequence[str], rows: Sequence[Sequence[Any]]) -> None:
    with open(path, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(columns)
        writer.writerows([_cell(v, precise=True) for v in row] for row in rows)


def _group(key: str) -> str:
    return next(name for name, matches in PLOT_GROUPS if matches(key))


def plot(runs: Sequence[Run], out_dir: str) -> list[str]:
    """One PNG per metric group present in the runs' metrics.jsonl; returns their paths."""
    try:
        import matplotlib
    except ImportError:
        raise DataError('--plots needs matplotlib: pip install -e ".[plots]"') from None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    keys = sorted(
        {k for r in runs for row in r.metrics for k, v in row.items() if _is_number(v)}
        - set(_NOT_PLOTTED)
    )
    os.makedirs(out_dir, exist_ok=True)
    paths = []
    for group, _ in PLOT_GROUPS:
        members = [k for k in keys if _group(k) == group]
        if not members:
            continue
        cols = min(3, len(members))
        nrows = math.ceil(len(members) / cols)
        fig, axes = plt.subplots(nrows, cols, figsize=(5 * cols, 3.5 * nrows), squeeze=False)
        for ax, key in zip(axes.flat, members, strict=False):
            for r in runs:
                points = [
                    (row["step"], row[key])
                    for row in r.metrics
                    if _is_number(row.get(key)) and _is_number(row.get("step"))
                ]
                if points:
                    xs, ys = zip(*points, strict=True)
                    ax.plot(xs, ys, marker="." if len(xs) < 20 else None, label=r.workdir)
            ax.set_title(key)
            ax.set_xlabel("step")
            ax.grid(alpha=0.3)
        for ax in axes.flat[len(members) :]:
            ax.axis("off")
        axes.flat[0].legend(fontsize="small")
        fig.tight_layout()
        path = os.path.join(out_dir, f"{group}.png")
        fig.savefig(path, dpi=100)
        plt.close(fig)
        paths.append(path)
    return paths


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m score_jax.results", description=__doc__.split("\n\n")[0]
    )
    parser.add_argument(
        "workdirs", nargs="+", help="workdirs of score_jax runs (e.g. runs/* 'gs://bucket/runs/*')"
    )
    parser.add_argument("--csv", metavar="PATH", help="also write the table as CSV")
    parser.add_argument("--plots", metavar="DIR", help="write PNG curves from metrics.jsonl")
    args = parser.parse_args(argv)

    def warn(message: str) -> None:
        print(f"score_jax.results: warning: {message}", file=sys.stderr)

    try:
        runs = load_runs(expand(args.workdirs), warn)
        columns, rows = table(runs)
        print(markdown(columns, rows))
        if args.csv:
            write_csv(args.csv, columns, rows)
        if args.plots:
            for path in plot(runs, args.plots):
                print(f"wrote {path}", file=sys.stderr)
    except (DataError, OSError) as e:
        sys.exit("score_jax.results: error: " + " ".join(str(e).split()))


if __name__ == "__main__":
    main()
