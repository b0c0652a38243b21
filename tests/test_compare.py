"""`leviathan compare`: configs x seeds under one budget, reuse, resume, failures, report."""

import argparse
import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from leviathan.cli import main
from leviathan.cli.compare import seeds_arg
from leviathan.compare import CompareError, compare, parse_budget
from leviathan.compare.plan import MARKER, plan
from leviathan.compare.report import final_point
from leviathan.compare.results import PairedDifference, cumulative_times
from leviathan.config import load_config
from leviathan.sizing import model_size
from leviathan.train.run_folder import RunLock
from leviathan.train.trainer import train

QUIET = {"log": lambda *_: None}


def write_config(folder: Path, name: str, corpus: Path, data_dir: Path, **model) -> str:
    raw = {
        "model": {
            "block_size": 16,
            "n_layer": 1,
            "n_head": 2,
            "d_model": 16,
            "mixer": {"kind": "token_xcorr", "window_q": 2, "window_k": 2, "rank": 1},
            **model,
        },
        "data": {"inputs": [str(corpus)], "dir": str(data_dir), "tokenizer": {"vocab_size": 384}},
        "train": {
            "seq_len": 16,
            "micro_batch_size": 2,
            "warmup_steps": 1,
            "eval_interval": 2,
            "eval_tokens": 64,
            "ckpt_interval": 2,
            "threads": 1,
        },
        "run": {"sample_tokens": 4},
    }
    path = folder / f"{name}.yaml"
    path.write_text(yaml.safe_dump(raw), encoding="utf-8")
    return str(path)


@pytest.fixture(scope="module")
def configs(corpus, tmp_path_factory) -> dict[str, str]:
    folder = tmp_path_factory.mktemp("configs")
    data_dir = folder / "data"
    return {
        "xcorr": write_config(folder, "xcorr", corpus, data_dir),
        "dot": write_config(folder, "dot", corpus, data_dir, mixer={"kind": "dot"}),
        # valid as a config, fails at train time: the tokenizer has 384 pieces
        "bad": write_config(folder, "bad", corpus, data_dir, vocab_size=1000),
    }


@pytest.fixture(scope="module")
def first(configs, tmp_path_factory):
    out = tmp_path_factory.mktemp("cmp") / "out"
    paths = [configs["xcorr"], configs["dot"], configs["bad"]]
    result = compare(paths, seeds=2, budget="steps=3", out=out, **QUIET)
    return out, paths, result


def test_every_config_and_seed_is_run_and_reported(first):
    out, _, result = first
    by_label = {c.label: c for c in result.configs}
    assert list(by_label) == ["xcorr", "dot", "bad"]
    for label in ("xcorr", "dot"):
        runs = by_label[label].runs
        assert [(r.name, r.status, r.steps) for r in runs] == [
            (f"{label}-s0", "trained", 3),
            (f"{label}-s1", "trained", 3),
        ]
        assert all(r.final_val_bpc > 0 for r in runs)
        # best: the periodic estimates alone, never mixed with the exact final value
        assert all(r.best_periodic_val_bpc == min(p["val_bpc"] for p in r.curve) for r in runs)
        assert runs[0].final_val_bpc != runs[1].final_val_bpc  # the seeds differ
        assert [p["step"] for p in runs[0].curve] == [2, 3]
        assert (out / "runs" / f"{label}-s1" / "summary.json").is_file()
        cfg = yaml.safe_load((out / "runs" / f"{label}-s1" / "config.yaml").read_text())
        assert cfg["train"]["seed"] == 1 and cfg["train"]["max_steps"] == 3
    assert by_label["xcorr"].mixer == "token_xcorr W=2x2 r=1"
    assert by_label["dot"].ffn == "dense gelu 4x"

    saved = json.loads((out / "results.json").read_text())
    assert saved["budget"] == "steps=3" and saved["seeds"] == [0, 1]
    rows = {c["label"]: c for c in saved["configs"]}
    finals = [r["final_val_bpc"] for r in rows["dot"]["runs"]]
    assert rows["dot"]["final_val_bpc_mean"] == pytest.approx(sum(finals) / 2)
    assert rows["dot"]["final_val_bpc_std"] == pytest.approx(abs(finals[0] - finals[1]) / 2**0.5)
    cfg = load_config(rows["xcorr"]["config"])
    cfg.model.vocab_size = 384
    assert rows["xcorr"]["params"] == model_size(cfg).total
    assert rows["xcorr"]["runs_ok"] == 2

    table = (out / "results.md").read_text()
    for label in ("xcorr", "dot", "bad"):
        assert f"| {label} |" in table
    assert f"{rows['dot']['final_val_bpc_mean']:.4f} ± " in table
    assert "| best periodic val BPC (estimate) |" in table
    dot = next(c for c in result.configs if c.label == "dot")  # the plots' star: exact final
    assert final_point(dot.ok, "step") == pytest.approx((3, rows["dot"]["final_val_bpc_mean"]))
    assert rows["dot"]["best_periodic_val_bpc"] == min(
        r["best_periodic_val_bpc"] for r in rows["dot"]["runs"]
    )
    for name in ("val_bpc_steps.png", "val_bpc_time.png"):
        assert (out / name).read_bytes()[:4] == b"\x89PNG"


def test_a_failing_config_is_reported_and_the_others_run(first):
    out, _, result = first
    bad = next(c for c in result.configs if c.label == "bad")
    assert [r.status for r in bad.runs] == ["failed", "failed"]
    assert "ConfigError: model.vocab_size: 1000 differs from the tokenizer" in bad.runs[0].error
    assert [r.name for r in result.failed] == ["bad-s0", "bad-s1"]
    assert bad.final_bpc() is None
    assert "model.vocab_size: 1000 differs" in (out / "results.md").read_text()
    saved = json.loads((out / "results.json").read_text())
    assert saved["configs"][2]["runs"][1]["status"] == "failed"
    assert "Traceback" in (out / "runs" / "bad-s0" / "error.txt").read_text()


def test_training_records_carry_throughput_in_flops(first):
    out, _, _ = first
    records = [json.loads(x) for x in (out / "runs" / "dot-s0" / "metrics.jsonl").open()]
    cfg = load_config(str(out / "runs" / "dot-s0" / "config.yaml"))
    flops = model_size(cfg).flops_per_token
    for r in records:
        assert r["flops_per_s"] == pytest.approx(3 * flops * r["tokens_per_s"])
        assert "mfu" not in r  # a CPU has no peak in the table


def test_rerun_reuses_finished_runs(first):
    out, paths, result = first
    stamps = {p: p.stat().st_mtime_ns for p in (out / "runs").glob("*/summary.json")}
    assert len(stamps) == 4
    again = compare(paths, seeds=2, budget="steps=3", out=out, **QUIET)
    statuses = {r.name: r.status for c in again.configs for r in c.runs}
    assert statuses == {
        "xcorr-s0": "reused",
        "xcorr-s1": "reused",
        "dot-s0": "reused",
        "dot-s1": "reused",
        "bad-s0": "failed",
        "bad-s1": "failed",
    }
    assert {p: p.stat().st_mtime_ns for p in stamps} == stamps  # nothing retrained
    old = {c.label: c.final_bpc() for c in result.configs}
    assert {c.label: c.final_bpc() for c in again.configs} == old


def test_a_run_recorded_before_a_key_existed_is_still_reused(first):
    """A marker written by an older version lacks the keys added since (study v2's runs
    have no parallel.ep_size): they take their defaults, and the run is reused."""
    out, paths, _ = first
    marker = out / "runs" / "dot-s0" / "compare.json"
    saved = marker.read_text()
    recorded = json.loads(saved)
    del recorded["config"]["parallel"]["ep_size"]
    del recorded["config"]["train"]["compile"]
    marker.write_text(json.dumps(recorded))
    try:
        again = compare(paths[1:2], seeds=1, budget="steps=3", out=out, **QUIET)
        assert [r.status for r in again.configs[0].runs] == ["reused"]
        recorded["config"]["train"]["lr"] *= 2  # a real difference is still refused
        marker.write_text(json.dumps(recorded))
        with pytest.raises(CompareError, match="train.lr"):
            compare(paths[1:2], seeds=1, budget="steps=3", out=out, **QUIET)
    finally:
        marker.write_text(saved)


def test_cli_exits_nonzero_when_a_run_failed(first):
    out, paths, _ = first
    done = subprocess.run(
        [sys.executable, "-m", "leviathan.cli", "compare", *paths[1:], "--seeds", "1"]
        + ["--budget", "steps=3", "--out", str(out)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 1, done.stderr
    assert "FAILED bad-s0: ConfigError" in done.stderr
    assert "results.md" in done.stdout


def test_a_changed_budget_or_config_is_refused_before_any_training(first):
    out, paths, _ = first
    with pytest.raises(CompareError, match=r"dot-s0 holds a run of another config or budget"):
        compare(paths[1:2], seeds=1, budget="steps=4", out=out, **QUIET)
    with pytest.raises(
        CompareError, match=r"another config or budget \(train\.eval_interval: 2 vs 3"
    ):
        compare(paths[1:2], seeds=1, budget="steps=3", out=out, overrides=["train.eval_interval=3"])
    assert json.loads((out / "runs" / "dot-s0" / MARKER).read_text())["budget"] == "steps=3"


def test_report_only_trains_nothing_and_lists_unfinished_runs_as_failed_or_pending(first, capsys):
    out, paths, result = first
    folders = sorted(p.name for p in (out / "runs").iterdir())
    stamps = {p: p.stat().st_mtime_ns for p in (out / "runs").glob("*/summary.json")}
    argv = ["compare", *paths, "--seeds", "0-2", "--budget", "steps=3", "--out", str(out)]
    assert main([*argv, "--report-only"]) == 1  # the bad config's runs failed earlier
    printed = capsys.readouterr().out
    assert "xcorr-s2: not finished, pending" in printed
    assert "bad-s0: FAILED earlier: ConfigError: model.vocab_size: 1000 differs" in printed
    assert sorted(p.name for p in (out / "runs").iterdir()) == folders  # nothing started
    assert {p: p.stat().st_mtime_ns for p in stamps} == stamps

    saved = json.loads((out / "results.json").read_text())
    assert saved["seeds"] == [0, 1, 2]
    for row, old in zip(saved["configs"][:2], result.configs[:2], strict=True):
        assert [r["status"] for r in row["runs"]] == ["reused", "reused", "pending"]
        assert row["runs_ok"] == 2
        assert row["final_val_bpc_mean"] == pytest.approx(old.final_bpc()[0])
    bad = saved["configs"][2]["runs"]
    assert [r["status"] for r in bad] == ["failed", "failed", "pending"]
    assert bad[0]["error"].startswith("ConfigError: model.vocab_size: 1000 differs")
    table = (out / "results.md").read_text()
    assert "| xcorr-s2 | 2 | pending | - |" in table and "| 2/3 |" in table


def test_a_failed_run_tried_again_loses_its_old_error(configs, tmp_path):
    out = tmp_path / "out"
    budget = parse_budget("steps=2")
    [[spec]] = plan([configs["dot"]], [0], budget, out, (), "disabled")
    spec.dir.mkdir(parents=True)
    (spec.dir / MARKER).write_text(json.dumps(spec.marker(budget)))
    (spec.dir / "error.txt").write_text("RuntimeError: out of memory\n\nTraceback ...")
    report = compare([configs["dot"]], seeds=1, budget=budget, out=out, report_only=True, **QUIET)
    [run] = report.configs[0].runs
    assert (run.status, run.error) == ("failed", "RuntimeError: out of memory")

    again = compare([configs["dot"]], seeds=1, budget=budget, out=out, **QUIET)
    assert again.configs[0].runs[0].status == "trained"
    assert not (spec.dir / "error.txt").exists()


def test_heldout_bpc_and_paired_differences_are_reported(configs, tmp_path):
    out = tmp_path / "out"
    overrides = ["data.val_documents=1", f"data.dir={tmp_path / 'data'}"]
    paths = [configs["dot"], configs["xcorr"]]
    # seed 1 first (as a second process sharing the folder would), then both: 1 is reused
    compare(paths, seeds=[1], budget="steps=2", out=out, overrides=overrides, **QUIET)
    result = compare(paths, seeds=[0, 1], budget="steps=2", out=out, overrides=overrides, **QUIET)
    dot, xcorr = result.configs
    assert [r.status for r in dot.runs] == ["trained", "reused"]
    for run in dot.runs + xcorr.runs:
        assert run.final_heldout_bpc > 0 and run.final_heldout_bpc != run.final_val_bpc

    saved = json.loads((out / "results.json").read_text())
    assert len(saved["data"]["heldout_documents"]) == 1
    rows = {c["label"]: c for c in saved["configs"]}
    held = [r.final_heldout_bpc for r in dot.runs]
    assert rows["dot"]["final_heldout_bpc_mean"] == pytest.approx(sum(held) / 2)
    diffs = {d["split"]: d for d in saved["paired_differences"]}
    assert set(diffs) == {"val", "heldout"}
    for split, attr in (("val", "final_val_bpc"), ("heldout", "final_heldout_bpc")):
        d = diffs[split]
        assert (d["label"], d["baseline"], d["seeds"]) == ("xcorr", "dot", [0, 1])
        pairs = zip(xcorr.runs, dot.runs, strict=True)
        want = [getattr(x, attr) - getattr(b, attr) for x, b in pairs]
        assert d["differences"] == pytest.approx(want)
        assert d["mean"] == pytest.approx(sum(want) / 2)
        assert d["std"] == pytest.approx(abs(want[0] - want[1]) / 2**0.5)
        t = None if d["std"] == 0 else pytest.approx(d["mean"] * 2**0.5 / d["std"])
        assert d["t"] == t

    table = (out / "results.md").read_text()
    assert "| held-out BPC |" in table and "## Paired differences against dot" in table
    assert f"| xcorr | heldout | 2 | {diffs['heldout']['mean']:+.4f} |" in table
    assert Path(saved["data"]["heldout_documents"][0]).stem in table


def test_a_run_another_process_is_training_is_left_untouched(configs, tmp_path):
    """Two comparisons sharing a folder: the run the other holds (its lock) is pending
    here, and nothing in its folder is written or deleted."""
    out = tmp_path / "out"
    budget = parse_budget("steps=2")
    spec = plan([configs["dot"]], [0], budget, out)[0][0]
    folder = spec.dir
    folder.mkdir(parents=True)
    (folder / "metrics.jsonl").touch()  # the other run's, before its first record
    marker = json.dumps(spec.marker(budget))
    (folder / MARKER).write_text(marker)
    holder = RunLock(folder)  # as the other process's training holds it
    try:
        result = compare([configs["dot"]], seeds=1, budget="steps=2", out=out, **QUIET)
    finally:
        holder.release()
    assert [r.status for r in result.configs[0].runs] == ["pending"]
    assert (folder / "metrics.jsonl").is_file()  # a fresh start here would delete it
    assert (folder / MARKER).read_text() == marker and not (folder / "error.txt").exists()
    assert not result.failed


def test_the_paired_t_statistic():
    d = PairedDifference("x", "dot", "val", [0, 1, 2], [-0.01, -0.02, -0.03])
    assert (d.mean, d.std, d.t) == pytest.approx((-0.02, 0.01, -0.02 / (0.01 / 3**0.5)))
    assert PairedDifference("x", "dot", "val", [0], [-0.01]).t is None


@pytest.mark.parametrize(
    ("text", "seeds"),
    [("3", 3), ("1", 1), ("0,2", [0, 2]), ("4,1", [4, 1]), ("2-2", [2]), ("0-1,4", [0, 1, 4])],
)
def test_seeds_are_a_count_or_a_list(text, seeds):
    assert seeds_arg(text) == seeds


@pytest.mark.parametrize("text", ["0", "-1", "1,1", "a", "1,-2", "", "3-1", "0-2,1"])
def test_bad_seeds_are_refused(text):
    with pytest.raises(argparse.ArgumentTypeError, match="expected a count"):
        seeds_arg(text)


def test_an_interrupted_run_resumes_from_its_checkpoint(configs, tmp_path):
    (spec,) = plan([configs["dot"]], [0], parse_budget("steps=3"), tmp_path)[0]
    spec.dir.mkdir(parents=True)
    (spec.dir / MARKER).write_text(json.dumps(spec.marker(parse_budget("steps=3"))))
    train(spec.cfg, stop_at=2, **QUIET)  # as if killed after the checkpoint at step 2
    (spec.dir / "summary.json").unlink()
    result = compare([configs["dot"]], seeds=1, budget="steps=3", out=tmp_path, **QUIET)
    (run,) = result.configs[0].runs
    assert (run.status, run.steps) == ("resumed", 3)
    steps = [json.loads(x)["step"] for x in (spec.dir / "metrics.jsonl").open()]
    assert steps == [1, 2, 3]


def test_minutes_budget_stops_on_the_clock(configs, tmp_path):
    peak = ["train.peak_flops=1e9"]  # a known peak: the records carry MFU, on a CPU too
    result = compare(
        [configs["dot"]], seeds=1, budget="minutes=1e-9", out=tmp_path, overrides=peak, **QUIET
    )
    (run,) = result.configs[0].runs
    assert run.status == "trained" and run.steps == 1  # time is up after the first step
    summary = json.loads((tmp_path / "runs" / "dot-s0" / "summary.json").read_text())
    assert summary["steps"] == 1 and summary["val_bpc"] == run.final_val_bpc
    (record,) = [json.loads(x) for x in (tmp_path / "runs" / "dot-s0" / "metrics.jsonl").open()]
    assert record["mfu"] == pytest.approx(record["flops_per_s"] / 1e9)


def test_a_minutes_run_resumed_after_its_time_is_up_only_finishes(configs, tmp_path):
    budget = parse_budget("minutes=1e-9")
    (spec,) = plan([configs["dot"]], [0], budget, tmp_path)[0]
    spec.dir.mkdir(parents=True)
    (spec.dir / MARKER).write_text(json.dumps(spec.marker(budget)))
    train(spec.cfg, stop_at=2, **QUIET)  # killed after its checkpoint, past its minutes
    (spec.dir / "summary.json").unlink()
    result = compare([configs["dot"]], seeds=1, budget="minutes=1e-9", out=tmp_path, **QUIET)
    (run,) = result.configs[0].runs
    assert (run.status, run.steps) == ("resumed", 2)
    assert [json.loads(x)["step"] for x in (spec.dir / "metrics.jsonl").open()] == [1, 2]


def test_tokens_budget_converts_to_steps(configs, tmp_path):
    # 2 rows x 16 tokens = 32 tokens per step: 100 tokens -> 4 steps
    (spec,) = plan([configs["dot"]], [5], parse_budget("tokens=100"), tmp_path)[0]
    assert spec.cfg.train.max_steps == 4 and spec.cfg.train.seed == 5
    assert spec.dir == tmp_path / "runs" / "dot-s5"


def test_configs_with_different_data_are_refused(configs, tmp_path):
    raw = yaml.safe_load(Path(configs["dot"]).read_text())
    raw["data"]["val_fraction"] = 0.1
    other = tmp_path / "other.yaml"
    other.write_text(yaml.safe_dump(raw))
    budget = parse_budget("steps=1")
    with pytest.raises(CompareError, match=r"different data sections \(data\.val_fraction: 0\.05"):
        plan([configs["xcorr"], str(other)], [0], budget, tmp_path)
    # an override applies to every config, so it can make them equal
    groups = plan([configs["xcorr"], str(other)], [0], budget, tmp_path, ["data.val_fraction=0.1"])
    assert [g[0].cfg.data.val_fraction for g in groups] == [0.1, 0.1]


@pytest.mark.parametrize(
    "text, message",
    [
        ("steps", "expected steps=K"),
        ("epochs=3", "expected steps=K"),
        ("steps=-1", "must be positive"),
        ("tokens=1.5", "whole number"),
        ("minutes=abc", "not a number"),
    ],
)
def test_bad_budgets_are_refused(text, message):
    with pytest.raises(CompareError, match=message):
        parse_budget(text)


def test_budgets_parse():
    assert str(parse_budget("tokens=1e6")) == "tokens=1e+06"
    assert parse_budget("minutes=1.5").seconds == 90
    assert parse_budget("steps=10").seconds is None


def test_cumulative_time_adds_sessions():
    records = [{"elapsed_s": t} for t in (1.0, 2.0, 0.5, 1.5)]  # resumed after the 2nd
    assert cumulative_times(records) == [1.0, 2.0, 2.5, 3.5]
