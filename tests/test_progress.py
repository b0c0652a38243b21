"""Progress that fits cluster logs: plain lines into a pipe, the bar only on a terminal."""

import contextlib
import io
import os
import pty
import re
import select
import struct
import subprocess
import sys
import warnings
from pathlib import Path

import pytest

from leviathan.config import config_from_dict
from leviathan.data import prepare
from leviathan.errors import ConfigError
from leviathan.train.progress import Progress, clock, step_line, use_bar

STEPS, INTERVAL = 12, 5
LINE = re.compile(
    r"^step (\d+)/12: loss \d+\.\d{4}, [\d,]+ tok/s, \d+\.\d GFLOP/s, "
    r"elapsed \d+:\d\d:\d\d, ETA \d+:\d\d:\d\d$"
)


@pytest.fixture(scope="module")
def data(corpus, tmp_path_factory) -> list[str]:
    """The dataset prepared once in this process (the trainings in subprocesses reuse it),
    as overrides."""
    folder = tmp_path_factory.mktemp("progress") / "prepared"
    raw = {"data": {"inputs": [str(corpus)], "dir": str(folder), "tokenizer": {"vocab_size": 384}}}
    prepare(config_from_dict(raw).data, log=lambda _: None)
    return [f"data.inputs=[{corpus}]", f"data.dir={folder}", "data.tokenizer.vocab_size=384"]


def train_command(data: list[str], run_dir: Path, *overrides: str) -> list[str]:
    return [
        sys.executable,
        "-m",
        "leviathan.cli",
        "train",
        "--wandb",
        "disabled",
        *data,
        "model.n_layer=1",
        "model.d_model=32",
        "model.n_head=2",
        "model.block_size=32",
        "train.seq_len=32",
        "train.micro_batch_size=2",
        f"train.max_steps={STEPS}",
        "train.warmup_steps=2",
        f"train.eval_interval={STEPS}",
        "train.eval_tokens=256",
        f"train.ckpt_interval={STEPS}",
        f"train.log_interval={INTERVAL}",
        "train.threads=1",
        "run.sample_tokens=4",
        f"run.dir={run_dir}",
        *overrides,
    ]


ENV = dict(os.environ, OMP_NUM_THREADS="1")


def test_into_a_pipe_plain_lines_no_frames(data, tmp_path):
    done = subprocess.run(
        train_command(data, tmp_path / "run"),
        capture_output=True,
        text=True,
        timeout=300,
        env=ENV,
    )
    assert done.returncode == 0, done.stderr
    assert "\r" not in done.stdout + done.stderr  # not one bar frame
    lines = [m for m in map(LINE.match, done.stdout.splitlines()) if m]
    assert [int(m[1]) for m in lines] == [1, 5, 10, 12]  # first, every 5th, last
    assert lines[-1][0].endswith("ETA 0:00:00")
    assert re.search(r"^step 12: train loss \d+\.\d+, val loss", done.stdout, re.M)


def run_on_terminal(command: list[str]) -> str:
    """Run `command` with stdout and stderr a pseudo-terminal of 120 columns; its output."""
    import fcntl
    import termios

    master, slave = pty.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 40, 120, 0, 0))
    child = subprocess.Popen(command, stdin=slave, stdout=slave, stderr=slave, env=ENV)
    os.close(slave)
    out = bytearray()
    while True:
        ready, _, _ = select.select([master], [], [], 1.0)
        if ready:
            try:
                chunk = os.read(master, 65536)
            except OSError:  # EIO: the child closed its end
                chunk = b""
            if not chunk:
                break
            out += chunk
        elif child.poll() is not None:
            break
    os.close(master)
    assert child.wait(timeout=300) == 0, out.decode(errors="replace")[-3000:]
    return out.decode(errors="replace")


def test_on_a_terminal_the_bar(data, tmp_path):
    out = run_on_terminal(train_command(data, tmp_path / "run"))
    assert re.search(r"\r\s*100%\|.*\| 12/12 \[", out)  # the bar's last frame
    assert "loss=" in out and "tok_s=" in out
    assert not re.search(r"^step \d+/12: loss", out, re.M)  # no plain progress lines


def test_forced_modes_and_terminal_test():
    class Tty(io.StringIO):
        def isatty(self) -> bool:
            return True

    assert use_bar("auto", Tty()) and not use_bar("auto", io.StringIO())
    assert use_bar("bar", io.StringIO()) and not use_bar("lines", Tty())
    stream = io.StringIO()
    Progress(10, 0, mode="bar", stream=stream).close()
    assert "\r" in stream.getvalue()


def record(step: int) -> dict:
    return {
        "step": step,
        "train_loss": 2.5,
        "tokens_per_s": 1234.5,
        "flops_per_s": 2.5e12,
        "mfu": 0.4125,
        "elapsed_s": 3723.0,
    }


def test_lines_mode_cadence_resume_and_early_stop():
    said = []
    progress = Progress(100, 40, mode="lines", interval=25, log=said.append)
    for step in range(41, 63):  # a resumed session stopped early (--stop-at 62)
        progress.step(record(step))
    progress.write("step 50: train loss 2.5, val loss 2.6, val BPC 1.2")
    progress.close()
    assert [s.split(":")[0] for s in said] == [
        "step 41/100",
        "step 50/100",
        "step 50",
        "step 62/100",  # the last step of the session, printed at close
    ]
    assert said[0].startswith("step 41/100: loss 2.5000, 1,234 tok/s, MFU 41.2%, elapsed 1:02:03")
    silent = Progress(100, 0, enabled=False, mode="lines", log=said.append)
    silent.step(record(1))
    silent.close()
    assert len(said) == 4  # off rank 0 nothing


def test_warnings_are_shown_above_the_bar():
    stream = io.StringIO()
    with warnings.catch_warnings():
        warnings.simplefilter("always")
        before = warnings.showwarning
        progress = Progress(10, 0, mode="bar", stream=stream)
        with contextlib.redirect_stdout(io.StringIO()) as out:  # tqdm.write's stream
            warnings.warn("capacity slots are shared", UserWarning, stacklevel=1)
        progress.close()
        assert warnings.showwarning is before
        lines = Progress(10, 0, mode="lines", log=print)  # plain lines: Python shows them
        assert warnings.showwarning is before
        lines.close()
    assert out.getvalue().startswith("warning: UserWarning: capacity slots are shared (")


def test_clock():
    assert clock(62.4) == "0:01:02"
    assert clock(3 * 3600 + 4) == "3:00:04"
    assert clock(-1) == "0:00:00"


def test_log_interval_must_be_positive():
    with pytest.raises(ConfigError, match=r"^train\.log_interval: must be positive, got 0"):
        config_from_dict({"train": {"log_interval": 0}})
    with pytest.raises(ConfigError, match=r"^train\.progress: expected one of 'auto'"):
        config_from_dict({"train": {"progress": "tty"}})


def test_an_moe_line_shows_imbalance_and_dropped():
    moe = {
        "layer0": {"imbalance": 1.5, "dropped_frac": 0.01},
        "layer1": {"imbalance": 2.25, "dropped_frac": 0.03},
    }
    line = step_line(record(7) | {"moe": moe}, 12, 5.0)
    # the worst layer's imbalance, the dropped share of all layers' assignments
    assert line.startswith("step 7/12: loss 2.5000, imbalance 2.25, dropped 2.0%, 1,234 tok/s")
    assert "imbalance" not in step_line(record(7), 12, None)  # a dense step
