"""Two user journeys, run as the docs show them: `leviathan` in a folder of one's own.

1. Your own corpus: `leviathan prepare --input mycode.txt data.dir=data/mycode`, then
   `leviathan train data.dir=data/mycode` trains on that dataset as it was prepared (no
   data.inputs given), in a run folder of its own, sampling from a prompt of the corpus;
   eval, inspect, sample and compare read the same dataset. Only an explicit data.inputs
   that differs is refused.
2. Resume from the run itself: `--resume run.dir=R` reads R's config.yaml, applies the
   overrides given (train.max_steps) and refuses one that changes the model or data, as
   do launch/train.py, launch/train_moe.py and compare's resumed runs.

Each command runs in a subprocess (the CLI's own), the cheap refusals in this process;
the model is one small layer trained a few steps, so the file takes about a minute.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import yaml

from leviathan.cli import main
from leviathan.compare.plan import MARKER, parse_budget, plan
from leviathan.config import default_run_dir, load_config
from leviathan.data import split_point
from leviathan.data.shards import PROMPT_CHARS
from leviathan.train.checkpoint import quiet
from leviathan.train.trainer import train

REPO = Path(__file__).resolve().parents[1]
SOURCES = ["leviathan/config.py", "leviathan/data/scan.py"]  # about 33 KB of Python
RUN = "runs/tiny-mycode"  # configs/tiny.yaml's run on the dataset data/mycode
SMALL = [  # configs/tiny.yaml, one layer, a few steps
    "model.n_layer=1",
    "train.warmup_steps=1",
    "train.eval_interval=2",
    "train.ckpt_interval=2",
    "train.micro_batch_size=4",
    "train.compile=false",
    "run.sample_tokens=16",
]
SHORT = [*SMALL, "train.max_steps=4", "run.wandb=disabled"]


def run(*argv: str, cwd: Path) -> subprocess.CompletedProcess:
    """A command as a user types it: `leviathan ...`, or `python launch/... ...`."""
    if argv[0].startswith("launch/"):
        command = [sys.executable, str(REPO / argv[0]), *argv[1:]]
    else:
        command = [str(Path(sys.executable).with_name("leviathan")), *argv]
    return subprocess.run(command, cwd=cwd, capture_output=True, text=True, timeout=300)


def snapshot(folder: Path) -> dict[str, tuple[int, int]]:
    """Every path under `folder` with its size and mtime: what `nothing written` compares."""
    return {
        str(p.relative_to(folder)): (p.stat().st_size, p.stat().st_mtime_ns)
        for p in sorted(folder.rglob("*"))
    }


def steps(run_dir: Path) -> list[int]:
    return [json.loads(line)["step"] for line in (run_dir / "metrics.jsonl").open()]


def saved_config(run_dir: Path) -> dict:
    return yaml.safe_load((run_dir / "config.yaml").read_text())


def refused(argv: list[str], folder: Path, capsys, *wanted: str) -> None:
    """`leviathan argv` exits 2 with one `error:` line naming `wanted`, writing nothing."""
    before = snapshot(folder)
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: "), err
    for text in wanted:
        assert text in err[0], err[0]
    assert snapshot(folder) == before


@pytest.fixture(scope="module")
def journey(tmp_path_factory) -> SimpleNamespace:
    """mycode.txt prepared into data/mycode, then trained by naming the folder."""
    folder = tmp_path_factory.mktemp("journey")
    text = "".join((REPO / path).read_text(encoding="utf-8") for path in SOURCES)
    (folder / "mycode.txt").write_text(text, encoding="utf-8")
    prepared = run("prepare", "--input", "mycode.txt", "data.dir=data/mycode", cwd=folder)
    assert prepared.returncode == 0, prepared.stderr
    trained = run("train", "data.dir=data/mycode", *SHORT, cwd=folder)
    assert trained.returncode == 0, trained.stderr
    return SimpleNamespace(folder=folder, text=text, prepared=prepared, trained=trained)


@pytest.fixture
def inside(journey, monkeypatch) -> Path:
    """This process in the journey's folder, as the user's shell is."""
    monkeypatch.chdir(journey.folder)
    return journey.folder


def test_a_prepared_folder_is_trained_on_by_naming_it(journey):
    out, run_dir = journey.trained.stdout, journey.folder / RUN
    assert "using the dataset in" in out and "as prepared from mycode.txt" in out
    assert f"run folder {RUN}," in out and "final val BPC" in out
    saved = saved_config(run_dir)
    assert saved["data"]["inputs"] is None and saved["run"]["sample_prompt"] is None
    assert steps(run_dir) == [1, 2, 3, 4]
    # the prompt: the first line of the validation text (the tail of mycode.txt), not ROMEO:
    val = journey.text[split_point(journey.text, 0.05) :]
    prompt = next(line.strip() for line in val.splitlines() if line.strip())[:PROMPT_CHARS]
    sample = (run_dir / "sample.txt").read_text()
    assert sample.startswith(prompt) and len(sample) > len(prompt) and "ROMEO" not in sample


def test_the_run_samples_evaluates_and_inspects_on_its_dataset(journey):
    folder = journey.folder
    sampled = run("sample", "--run", RUN, "--prompt", "def ", "--max-new-tokens", "8", cwd=folder)
    assert sampled.returncode == 0 and sampled.stdout.startswith("def "), sampled.stderr
    evaluated = run("eval", "--run", RUN, cwd=folder)
    assert evaluated.returncode == 0, evaluated.stderr
    bpc = journey.trained.stdout.split("final val BPC ")[1].split()[0]
    assert f"val BPC {bpc}" in evaluated.stdout
    inspected = run("inspect", "--run", RUN, "--windows", "1", "--out", "inspect", cwd=folder)
    assert inspected.returncode == 0, inspected.stderr
    assert (folder / "inspect" / "lag_kernels.png").is_file()


def test_only_explicit_inputs_that_differ_are_refused(journey, inside, capsys):
    asked = ["train", "data.dir=data/mycode", *SHORT]
    refused(
        [*asked, "data.inputs=[]"],
        inside,
        capsys,
        "data.dir",
        "prepared from mycode.txt, but data.inputs asks for the bundled Shakespeare corpus",
    )
    refused([*asked, "--rebuild"], inside, capsys, "--rebuild: data.inputs is not given")
    assert main(["prepare", "data.dir=data/mycode"]) == 0  # the folder, as it is
    assert "as prepared from mycode.txt" in capsys.readouterr().out


def test_resume_continues_the_run_with_its_own_config(journey):
    folder = journey.folder
    shutil.copytree(folder / RUN, folder / "runs/again")
    resumed = run("train", "--resume", "run.dir=runs/again", "train.max_steps=6", cwd=folder)
    assert resumed.returncode == 0, resumed.stderr
    assert steps(folder / "runs/again") == [1, 2, 3, 4, 5, 6]
    saved = saved_config(folder / "runs/again")  # one layer, as the run, not tiny.yaml's 4
    assert saved["model"]["n_layer"] == 1 and saved["train"]["max_steps"] == 6
    assert saved["run"]["dir"] == "runs/again"
    # launch/train.py reads it too; --config only names the folder (a note says so)
    argv = ["--config", "configs/tiny-dot.yaml", "--resume", "run.dir=runs/again"]
    launched = run("launch/train.py", *argv, "train.max_steps=8", cwd=folder)
    assert launched.returncode == 0, launched.stderr
    assert "the settings of --config configs/tiny-dot.yaml are not read" in launched.stderr
    assert "mixer token_xcorr" in launched.stdout and "after 8 steps" in launched.stdout
    assert steps(folder / "runs/again") == list(range(1, 9))


def test_resume_refuses_what_would_change_the_run(journey, inside, capsys):
    resume = ["train", "--resume", f"run.dir={RUN}"]
    refused(["train", "--resume", "run.dir=runs/nowhere"], inside, capsys, "runs/nowhere")
    assert not (inside / "runs/nowhere").exists()
    (inside / "runs/empty").mkdir()
    refused(["train", "--resume", "run.dir=runs/empty"], inside, capsys, "no config.yaml")
    refused([*resume, "model.n_layer=2"], inside, capsys, "model.n_layer: 2", "has 1")
    refused([*resume, "data.tokenizer.vocab_size=256"], inside, capsys, "data.tokenizer")
    refused(["train", "--resume-from", "2", f"run.dir={RUN}", "data.inputs=[x]"], inside, capsys)
    before = snapshot(inside)
    ray_job = run(
        "launch/train_moe.py", "--resume", f"run.dir={RUN}", "model.d_model=64", cwd=inside
    )
    assert ray_job.returncode == 2 and ray_job.stderr.startswith("error: model.d_model: 64")
    assert snapshot(inside) == before


def test_compare_resumes_an_interrupted_run_from_its_own_config(journey, inside):
    overrides = ["data.dir=data/mycode", *SMALL]
    budget = parse_budget("steps=4")
    (spec,) = plan(["configs/tiny.yaml"], [0], budget, inside / "cmp", overrides)[0]
    spec.dir.mkdir(parents=True)
    (spec.dir / MARKER).write_text(json.dumps(spec.marker(budget)))
    train(spec.cfg, stop_at=2, log=quiet)  # as if killed after the checkpoint at step 2
    (spec.dir / "summary.json").unlink()
    argv = ["configs/tiny.yaml", *overrides, "train.threads=1", "--budget", "steps=4"]
    compared = run("compare", *argv, "--out", "cmp", cwd=inside)
    assert compared.returncode == 0, compared.stderr
    assert "tiny-s0: resuming from step 2" in compared.stdout
    assert steps(spec.dir) == [1, 2, 3, 4]
    assert saved_config(spec.dir)["train"]["threads"] == 1  # the comparison's, over the run's
    marker = json.loads((spec.dir / MARKER).read_text())
    assert marker["config"]["data"]["inputs"] == ["mycode.txt"]  # the dataset's own


def test_not_given_inputs_and_the_default_run_folder():
    assert load_config().data.inputs is None  # tiny.yaml names no corpus
    assert load_config(None, ["data.inputs=[]"]).data.inputs == []  # given: the bundled one
    assert load_config().run.dir == "runs/tiny" == default_run_dir("tiny", "data/x", "data/x/")
    assert load_config(None, ["data.dir=data/mycode"]).run.dir == RUN
    assert load_config(None, ["data.dir=data/mycode", "run.dir=r"]).run.dir == "r"
