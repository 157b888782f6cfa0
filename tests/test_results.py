"""`python -m score_jax.results`: the table of many workdirs and the PNG curves, on workdirs
written by hand here (the values the cells must show are the ones written)."""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
import time

import pytest
from cli_helpers import REPO

from score_jax import results

CONFIG = {
    "seed": 0,
    "batch_size": 128,
    "dataset": {"name": "cifar10", "num_validation": 1024},
    "loss": {"kind": "se", "beta": 6.0},
    "attack": {"eps": 0.03125, "norm": "linf"},
    "optim": {"learning_rate": 0.05, "lr_boundaries_epochs": [100, 105]},
}
# Run a: today's results.json; run b: one entry per evaluator (nested), and AutoAttack.
RESULTS_A = {
    "checkpoint": "best",
    "step": 300,
    "attack": {"eps": 0.031372549, "norm": "linf", "num_steps": 20},
    "test_ema": {"clean_accuracy": 0.8123, "adv_accuracy": 0.5234, "num_examples": 10000},
    "test_raw": {"clean_accuracy": 0.8011, "adv_accuracy": 0.5102, "num_examples": 10000},
}
RESULTS_B = {
    "checkpoint": "last",
    "step": 200,
    "test_ema": {
        "clean_accuracy": 0.7777,
        "pgd": {"accuracy": 0.4444},
        "pgd_se": {"accuracy": 0.46},
    },
}
AUTOATTACK_B = {"clean_accuracy": 0.78, "robust_accuracy": 0.4321, "version": "standard"}


def _metrics(steps: int, lr: float) -> list[dict]:
    rows = []
    for step in range(10, steps + 1, 10):
        rows.append(
            {
                "step": step,
                "train/loss": 2.0 / step,
                "train/clean_accuracy": 0.5,
                "train/adv_accuracy": 0.3,
                "train/learning_rate": lr,
                "train/momentum": 0.9,
                "train/grad_norm": 1.0,
                "train/epoch": step / 10,
            }
        )
        if step % 50 == 0:
            rows.append({"step": step, "val/ema_adv_accuracy": 0.4, "val/ema_clean_accuracy": 0.7})
    return rows


def _workdir(root, name: str, config=None, result=None, autoattack=None, metrics=None) -> str:
    path = root / name
    path.mkdir()
    for file, content in (
        ("config.json", config),
        ("results.json", result),
        ("autoattack.json", autoattack),
    ):
        if content is not None:
            (path / file).write_text(json.dumps(content, indent=2))
    if metrics is not None:
        (path / "metrics.jsonl").write_text("".join(json.dumps(m) + "\n" for m in metrics))
    return str(path)


def _runs(tmp_path) -> list[str]:
    config_b = json.loads(json.dumps(CONFIG))
    config_b["loss"]["kind"] = "kl"
    config_b["optim"]["learning_rate"] = 0.1
    config_b["attack"]["eps"] = 0.0625  # a config column; results.json's attack.eps is another
    config_c = json.loads(json.dumps(CONFIG))
    config_c["seed"] = 1
    return [
        _workdir(tmp_path, "a", CONFIG, RESULTS_A, None, _metrics(300, 0.05)),
        _workdir(tmp_path, "b", config_b, RESULTS_B, AUTOATTACK_B, _metrics(200, 0.1)),
        _workdir(tmp_path, "c", config_c, None, None, _metrics(70, 0.05)),  # still training
    ]


def _markdown_rows(text: str) -> list[dict[str, str]]:
    lines = [line for line in text.splitlines() if line.startswith("|")]
    header = [c.strip() for c in lines[0].strip("|").split("|")]
    assert set(lines[1]) <= set("|-")
    rows = [[c.strip() for c in line.strip("|").split("|")] for line in lines[2:]]
    return [dict(zip(header, row, strict=True)) for row in rows]


def test_table_cells_are_the_values_written(tmp_path, capsys):
    dirs = _runs(tmp_path)
    csv_path = tmp_path / "table.csv"
    results.main([*dirs, "--csv", str(csv_path)])
    out = capsys.readouterr()
    assert out.err == ""
    rows = {r["run"]: r for r in _markdown_rows(out.out)}
    a, b, c = (rows[d] for d in dirs)
    # Only the config fields that differ (between "run" and "step"), with the values written.
    columns = list(a)
    differing = ["attack.eps", "loss.kind", "optim.learning_rate", "seed"]
    assert columns[1 : columns.index("step")] == differing
    assert (float(a["attack.eps"]), float(b["attack.eps"])) == (0.03125, 0.0625)
    assert (a["loss.kind"], b["loss.kind"], c["loss.kind"]) == ("se", "kl", "se")
    assert (a["seed"], b["seed"], c["seed"]) == ("0", "0", "1")
    assert float(b["optim.learning_rate"]) == 0.1
    # Steps: results.json's, else the last logged step.
    assert (a["step"], b["step"], c["step"]) == ("300", "200", "70")
    # Every number of results.json / autoattack.json, whatever its nesting; others blank.
    numbers = [f"results:attack.{k}" for k in ("eps", "num_steps")]
    numbers += [f"results:test_ema.{k}" for k in ("adv_accuracy", "clean_accuracy", "num_examples")]
    numbers += ["results:test_ema.pgd.accuracy", "results:test_ema.pgd_se.accuracy"]
    numbers += [f"results:test_raw.{k}" for k in ("adv_accuracy", "clean_accuracy", "num_examples")]
    numbers += ["autoattack:clean_accuracy", "autoattack:robust_accuracy"]
    assert columns[columns.index("step") + 1 :] == numbers  # no wall_s: no TensorBoard here
    assert float(a["results:test_ema.adv_accuracy"]) == pytest.approx(0.5234, abs=5e-5)
    assert float(a["results:test_raw.clean_accuracy"]) == pytest.approx(0.8011, abs=5e-5)
    assert float(a["results:attack.eps"]) == pytest.approx(0.031372549, rel=1e-3)
    assert float(b["results:test_ema.pgd.accuracy"]) == pytest.approx(0.4444, abs=5e-5)
    assert float(b["autoattack:robust_accuracy"]) == pytest.approx(0.4321, abs=5e-5)
    assert b["results:test_ema.adv_accuracy"] == "" and a["autoattack:robust_accuracy"] == ""
    assert all(v == "" for k, v in c.items() if k.startswith(("results:", "autoattack:")))
    assert "results:checkpoint" not in a and "autoattack:version" not in a  # not numbers
    # The CSV: the same table at full precision.
    with open(csv_path) as f:
        csv_rows = {r["run"]: r for r in csv.DictReader(f)}
    assert list(csv_rows[dirs[0]]) == list(a)
    assert float(csv_rows[dirs[0]]["results:attack.eps"]) == 0.031372549
    assert float(csv_rows[dirs[1]]["results:test_ema.pgd_se.accuracy"]) == 0.46


def test_wall_time_from_tensorboard_sessions(tmp_path, capsys):
    """Two sessions (a resume): each from its writer's start to its last event, summed."""
    from tensorboardX import SummaryWriter

    workdir = _workdir(tmp_path, "run", CONFIG, RESULTS_A)
    spans = []
    for session, length in enumerate((100.0, 30.0)):
        before = time.time()
        writer = SummaryWriter(os.path.join(workdir, "tensorboard"), filename_suffix=f".{session}")
        after = time.time()
        writer.add_scalar("train/loss", 1.0, 10, walltime=before + length)
        writer.close()
        spans.append((length - (after - before), length))
    run = results.load_run(workdir)
    low, high = sum(s[0] for s in spans), sum(s[1] for s in spans)
    assert low - 1e-3 <= run.wall_s <= high + 1e-3
    results.main([workdir])
    row = _markdown_rows(capsys.readouterr().out)[0]
    assert float(row["wall_s"]) == pytest.approx(run.wall_s, rel=1e-3)


def _remove(workdir: str, name: str) -> None:
    os.remove(os.path.join(workdir, name))


def _append(workdir: str, name: str, text: str) -> None:
    with open(os.path.join(workdir, name), "a") as f:
        f.write(text)


DAMAGES = {
    "no config.json": (lambda d: _remove(d, "config.json"), "config.json: missing"),
    "corrupt results.json": (lambda d: _append(d, "results.json", "}"), "results.json: not valid"),
    "corrupt metrics line": (lambda d: _append(d, "metrics.jsonl", "{oops\n"), "metrics.jsonl:37:"),
    "binary metrics line": (
        lambda d: _append_bytes(d, "metrics.jsonl", b"\x00\xff\n"),
        "metrics.jsonl:37: not UTF-8 text",
    ),
    "results.json not a dict": (
        lambda d: _write(d, "results.json", "[0.5, 0.25]"),
        "results.json: expected a JSON object, got a list",
    ),
}


def _append_bytes(workdir: str, name: str, data: bytes) -> None:
    with open(os.path.join(workdir, name), "ab") as f:
        f.write(data)


def _write(workdir: str, name: str, text: str) -> None:
    with open(os.path.join(workdir, name), "w") as f:
        f.write(text)


@pytest.mark.parametrize("case", list(DAMAGES))
def test_bad_workdir_is_skipped_with_a_warning(tmp_path, capsys, case):
    dirs = _runs(tmp_path)
    damage, named = DAMAGES[case]
    damage(dirs[0])
    results.main(dirs)
    out = capsys.readouterr()
    warning = out.err.strip()
    assert "\n" not in warning and named in warning and dirs[0] in warning
    assert [r["run"] for r in _markdown_rows(out.out)] == dirs[1:]


def test_no_usable_workdir_is_a_one_line_error(tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    out = subprocess.run(
        [sys.executable, "-m", "score_jax.results", str(empty), str(tmp_path / "nowhere")],
        cwd=REPO,
        env=dict(os.environ, PYTHONPATH=REPO),
        capture_output=True,
        text=True,
    )
    assert out.returncode != 0 and out.stdout == ""
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 3
    assert lines[-1] == "score_jax.results: error: no usable workdir among the 2 given"
    assert "empty/config.json: missing" in lines[0] and "nowhere/config.json" in lines[1]


def test_plots_one_png_per_metric_group(tmp_path, capsys):
    dirs = _runs(tmp_path)
    out_dir = tmp_path / "plots"
    results.main([*dirs, "--plots", str(out_dir)])
    # The keys written above, grouped by hand.
    expected = {"train_loss", "train_accuracy", "validation", "learning_rate", "momentum", "other"}
    assert {p.removesuffix(".png") for p in os.listdir(out_dir)} == expected
    for name in expected:
        with open(out_dir / f"{name}.png", "rb") as f:
            assert f.read(8) == b"\x89PNG\r\n\x1a\n"
    assert "wrote" in capsys.readouterr().err


def test_plots_without_matplotlib_is_one_line(tmp_path, monkeypatch):
    dirs = _runs(tmp_path)
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # `import matplotlib` raises ImportError
    message = r"--plots needs matplotlib: pip install -e \"\.\[plots\]\""
    with pytest.raises(SystemExit, match=message):
        results.main([*dirs, "--plots", str(tmp_path / "plots")])


def _upload(local_dir: str, url: str) -> None:
    """Copies every file under `local_dir` to the prefix `url`, with google-cloud-storage (not
    the gcsfs client that results.py reads through)."""
    from google.cloud import storage

    bucket_name, prefix = url.removeprefix("gs://").split("/", 1)
    bucket = storage.Client().bucket(bucket_name)
    for folder, _, files in os.walk(local_dir):
        for name in files:
            path = os.path.join(folder, name)
            bucket.blob(f"{prefix}/{os.path.relpath(path, local_dir)}").upload_from_filename(path)


def test_runs_in_a_bucket_and_local_ones_in_one_table(tmp_path, capsys, gcs_bucket):
    """`'gs://.../runs/*' local_run`: the glob expanded on gs://, each row as the same run's row
    read from local disk, wall time from an uploaded TensorBoard file, a bad remote workdir
    skipped with a warning naming its gs:// file."""
    import uuid

    from tensorboardX import SummaryWriter

    dirs = _runs(tmp_path)
    before = time.time()  # the writer's first event is stamped at or after this
    writer = SummaryWriter(os.path.join(dirs[0], "tensorboard"))
    writer.add_scalar("train/loss", 1.0, 10, walltime=before + 50.0)
    writer.close()
    results.main(dirs)
    local = {os.path.basename(r["run"]): r for r in _markdown_rows(capsys.readouterr().out)}

    runs = f"{gcs_bucket}/results-{uuid.uuid4().hex[:8]}/runs"
    _upload(dirs[0], f"{runs}/a")
    _upload(dirs[1], f"{runs}/b")
    os.remove(os.path.join(dirs[1], "config.json"))
    _upload(dirs[1], f"{runs}/b_no_config")
    results.main([f"{runs}/*", dirs[2]])
    out = capsys.readouterr()
    rows = _markdown_rows(out.out)
    assert [r["run"] for r in rows] == [f"{runs}/a", f"{runs}/b", dirs[2]]
    for row in rows:
        assert {**row, "run": ""} == {**local[os.path.basename(row["run"])], "run": ""}
    assert 49.0 < float(rows[0]["wall_s"]) <= 50.0 and rows[1]["wall_s"] == ""
    assert out.err.strip() == (
        f"score_jax.results: warning: {runs}/b_no_config/config.json: missing (not a score_jax "
        f"workdir?); skipped {runs}/b_no_config"
    )
    # A pattern matching nothing is reported as the workdir it names.
    with pytest.raises(SystemExit, match="no usable workdir among the 1 given"):
        results.main([f"{runs}/z*"])
    assert f"{runs}/z*/config.json: missing" in capsys.readouterr().err
