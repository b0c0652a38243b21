"""W&B as users have it: `run.wandb: auto` resolves as W&B does (a `wandb login` key in
~/.netrc, WANDB_MODE), and a real offline run holds what the run logged: the config and
layout, the curves and expert-load figures as images, the sample as text.

Nothing of wandb is mocked: each case gets a fake HOME (with or without the ~/.netrc entry
`wandb login` writes) and W&B is torn down around it, so it reads its settings afresh. The
offline run's `run-<id>.wandb` file is read with W&B's own protobuf records.
"""

from __future__ import annotations

import json
import os
import re
import struct
import subprocess
import sys
from pathlib import Path

import pytest
import wandb
from wandb.proto import wandb_internal_pb2

from leviathan.config import config_from_dict
from leviathan.data import prepare
from leviathan.errors import ConfigError
from leviathan.train.checkpoint import quiet
from leviathan.train.metrics import resolve_wandb_mode

KEY = "0123456789abcdef0123456789abcdef01234567"  # the shape of a W&B API key, not a key


def netrc_home(home: Path, key: str | None) -> Path:
    """A HOME whose ~/.netrc holds `key` for api.wandb.ai, as `wandb login` leaves it."""
    home.mkdir(parents=True, exist_ok=True)
    if key is not None:
        netrc = home / ".netrc"
        netrc.write_text(f"machine api.wandb.ai\n  login user\n  password {key}\n")
        netrc.chmod(0o600)
    return home


def user_env(home: Path, **wandb_vars: str) -> dict[str, str]:
    """This process's environment with HOME replaced and only the given WANDB_* set."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("WANDB_") and k != "NETRC"}
    return env | {"HOME": str(home), "OMP_NUM_THREADS": "1"} | wandb_vars


@pytest.fixture
def fresh_wandb(tmp_path, monkeypatch):
    """Set the user's environment, then let W&B load its settings from it, as a new
    process would (its settings and credentials are read once per process)."""

    def enter(home: Path, **wandb_vars: str) -> None:
        for key in [k for k in os.environ if k.startswith("WANDB_") or k == "NETRC"]:
            monkeypatch.delenv(key)
        for key, value in user_env(home, **wandb_vars).items():
            monkeypatch.setenv(key, value)
        wandb.teardown()

    monkeypatch.chdir(tmp_path)  # no ./wandb/settings of the checkout
    yield enter
    wandb.teardown()


@pytest.mark.parametrize(
    "key,wandb_vars,settings,expected",
    [
        (KEY, {}, None, "online"),  # `wandb login`: the key is in ~/.netrc only
        (None, {"WANDB_API_KEY": KEY}, None, "online"),
        (None, {}, None, "offline"),  # no credentials anywhere
        (KEY, {"WANDB_MODE": "disabled"}, None, "disabled"),
        (KEY, {"WANDB_MODE": "offline"}, None, "offline"),
        (KEY, {}, "mode = offline", "offline"),  # `wandb offline`, in W&B's settings file
    ],
)
def test_auto_resolves_as_wandb_does(fresh_wandb, tmp_path, key, wandb_vars, settings, expected):
    home = netrc_home(tmp_path / "home", key)
    if settings is not None:
        (home / ".config" / "wandb").mkdir(parents=True)
        (home / ".config" / "wandb" / "settings").write_text(f"[default]\n{settings}\n")
    fresh_wandb(home, **wandb_vars)
    assert resolve_wandb_mode("auto")[0] == expected
    assert resolve_wandb_mode("offline") == ("offline", "run.wandb=offline")  # as given


def test_bad_wandb_settings_name_the_variable(fresh_wandb, tmp_path):
    fresh_wandb(netrc_home(tmp_path / "home", None), WANDB_MODE="sometimes")
    with pytest.raises(ConfigError, match=r"^W&B settings: WANDB_MODE .*got 'sometimes'$"):
        resolve_wandb_mode("auto")
    fresh_wandb(netrc_home(tmp_path / "home", "short"))
    with pytest.raises(ConfigError, match=r"~/\.netrc .*API key must have 40\+ characters"):
        resolve_wandb_mode("auto")


@pytest.fixture(scope="module")
def data(corpus, tmp_path_factory) -> list[str]:
    """The three-play dataset prepared once, as the overrides that find it."""
    folder = tmp_path_factory.mktemp("wandb") / "prepared"
    raw = {"data": {"inputs": [str(corpus)], "dir": str(folder), "tokenizer": {"vocab_size": 384}}}
    prepare(config_from_dict(raw).data, log=quiet)
    return [f"data.inputs=[{corpus}]", f"data.dir={folder}", "data.tokenizer.vocab_size=384"]


def train_moe(data: list[str], run_dir: Path, env: dict[str, str]) -> subprocess.CompletedProcess:
    """`leviathan train` of a one-layer tiny-moe for 4 steps, W&B left to `auto`."""
    command = [sys.executable, "-m", "leviathan.cli", "train", "--config", "configs/tiny-moe.yaml"]
    overrides = [
        *data,
        f"run.dir={run_dir}",
        "run.wandb=auto",
        "run.sample_tokens=8",
        "model.n_layer=1",
        "train.max_steps=4",
        "train.warmup_steps=1",
        "train.eval_interval=2",
        "train.eval_tokens=1024",
        "train.ckpt_interval=4",
        "train.micro_batch_size=8",
        "train.compile=false",
        "train.threads=1",
        "train.progress=lines",
        "train.log_interval=1",
    ]
    repo = Path(__file__).resolve().parents[1]
    return subprocess.run(
        [*command, *overrides], cwd=repo, env=env, capture_output=True, text=True, timeout=300
    )


def wandb_records(path: Path) -> list[wandb_internal_pb2.Record]:
    """The records of a `run-<id>.wandb` file: a 7-byte W&B header, then LevelDB-log
    chunks (4-byte checksum, 2-byte length, 1-byte type) in 32 KiB blocks; a record is
    one FULL chunk or FIRST, MIDDLE..., LAST."""
    data, block = path.read_bytes(), 32768
    assert data[:4] == b":W&B"
    records, pos, payload = [], 7, b""
    while pos + 7 <= len(data):
        if block - pos % block < 7:  # a block's tail too short for a header is padding
            pos += block - pos % block
            continue
        length, kind = struct.unpack_from("<HB", data, pos + 4)
        payload += data[pos + 7 : pos + 7 + length]
        pos += 7 + length
        if kind in (1, 4):  # FULL, LAST
            records.append(wandb_internal_pb2.Record.FromString(payload))
            payload = b""
    return records


def logged(records: list[wandb_internal_pb2.Record]) -> tuple[dict, dict]:
    """The run's config, and every history value by key (nested keys joined with /)."""
    config, history = {}, {}
    for record in records:
        kind = record.WhichOneof("record_type")
        if kind == "run":
            config = {i.key: json.loads(i.value_json) for i in record.run.config.update}
        elif kind == "history":
            for item in record.history.item:
                key = item.key or "/".join(item.nested_key)
                history.setdefault(key, []).append(json.loads(item.value_json))
    return config, history


@pytest.mark.slow
def test_moe_run_logs_to_an_offline_wandb_run(data, tmp_path):
    # a user who ran `wandb login` and then `export WANDB_MODE=offline`
    home = netrc_home(tmp_path / "home", KEY)
    run_dir = tmp_path / "run"
    done = train_moe(data, run_dir, user_env(home, WANDB_MODE="offline"))
    assert done.returncode == 0, done.stderr[-3000:]
    assert "W&B: offline (W&B's mode is offline" in done.stdout
    routing = re.compile(r"^step (\d)/4: loss [\d.]+, imbalance \d\.\d\d, dropped 0\.0%, ", re.M)
    assert [int(step) for step in routing.findall(done.stdout)] == [1, 2, 3, 4]

    (offline,) = (run_dir / "wandb").glob("offline-run-*")
    config, history = logged(wandb_records(next(offline.glob("run-*.wandb"))))
    assert config["model"]["ffn"]["n_experts"] == 8
    assert config["layout"]["engine"] == "torch"
    assert config["layout"]["world_size"] == 1
    for key in ("train_loss", "val_bpc", "final_val_bpc", "moe/layer0/imbalance"):
        assert key in history, sorted(history)
    for key in ("curves", "moe/expert_load", "moe/balance"):
        assert history[f"{key}/_type"][-1] == "image-file"
        assert (offline / "files" / history[f"{key}/path"][-1]).is_file()
    # at each evaluation (steps 2 and 4; the end's figures go into step 4's row)
    assert len(history["moe/expert_load/path"]) == 2
    table = json.loads((offline / "files" / history["sample/path"][-1]).read_text())
    sample = (run_dir / "sample.txt").read_text().removesuffix("\n")
    assert table == {"columns": ["step", "sample"], "data": [[4, sample]]}
    for name in ("curves.png", "expert_load.png", "moe_balance.png"):
        assert (run_dir / name).is_file()


@pytest.mark.slow
def test_bad_wandb_mode_is_one_error_line(data, tmp_path):
    home = netrc_home(tmp_path / "home", None)
    done = train_moe(data, tmp_path / "run", user_env(home, WANDB_MODE="sometimes"))
    assert done.returncode == 2, done.stderr[-3000:]
    assert done.stderr.strip().splitlines()[-1].startswith("error: W&B settings: WANDB_MODE")
    assert "Traceback" not in done.stderr
