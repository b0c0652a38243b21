"""A new mixer is one class and one registry line (issue 11): registered here, a toy
mixer trains, is compared and is inspected, with nothing else in leviathan told of it."""

from __future__ import annotations

import json
from dataclasses import dataclass

import pytest
import torch
import yaml
from torch import Tensor, nn

from leviathan.compare import compare
from leviathan.config import load_config
from leviathan.inspection import inspect_run
from leviathan.model import MIXERS, correlation
from leviathan.model.cache import LayerCache
from leviathan.model.mixers import Mixer
from leviathan.train.trainer import train
from leviathan.trained import load_run

QUIET = {"log": lambda *_: None}


@dataclass
class SharpOptions:
    kind: str = "sharp"


class SharpMixer(Mixer):
    """Dot-product attention with a learned sharpness per head (a toy lag weight)."""

    Options = SharpOptions

    def __init__(self, d_model: int, n_head: int, options: SharpOptions, **kw) -> None:
        super().__init__(d_model, n_head, options, **kw)
        self.sharpness = nn.Parameter(torch.ones(n_head))

    def sharpen(self, q: Tensor) -> Tensor:
        return q * self.sharpness.view(1, -1, 1, 1)

    def attend(self, q: Tensor, k: Tensor, v: Tensor, dropout_p: float) -> Tensor:
        return correlation.dot_attention(
            self.sharpen(q), k, v, reference=self.reference, dropout_p=dropout_p
        )

    def lagged(self, q: Tensor, k: Tensor, cache: LayerCache) -> tuple[Tensor, Tensor]:
        return self.sharpen(q), k

    def lag_parameters(self) -> list[nn.Parameter]:
        return [self.sharpness]

    def lag_weights(self) -> Tensor:
        return self.sharpness.unsqueeze(1)

    def scores(self, q: Tensor, k: Tensor) -> Tensor:
        return correlation.dot_scores(self.sharpen(q), k)

    @classmethod
    def describe(cls, options: SharpOptions) -> str:
        return "sharp dot"


@pytest.fixture
def sharp(monkeypatch, corpus, tmp_path) -> str:
    monkeypatch.setitem(MIXERS, "sharp", SharpMixer)  # the one registry line
    raw = {
        "model": {"block_size": 16, "n_layer": 2, "n_head": 2, "d_model": 16}
        | {"mixer": {"kind": "sharp"}},
        "data": {"inputs": [str(corpus)], "dir": str(tmp_path / "data")}
        | {"tokenizer": {"vocab_size": 384}},
        "train": {"seq_len": 16, "micro_batch_size": 4, "max_steps": 3, "lr": 1e-2}
        | {"warmup_steps": 1, "eval_interval": 3, "eval_tokens": 64, "threads": 1},
        "run": {"dir": str(tmp_path / "run"), "wandb": "disabled", "sample_tokens": 4},
    }
    path = tmp_path / "sharp.yaml"
    path.write_text(yaml.safe_dump(raw), encoding="utf-8")
    return str(path)


def test_a_registered_mixer_trains_compares_and_inspects(sharp, tmp_path):
    summary = train(load_config(sharp), **QUIET)
    assert summary.steps == 3 and summary.val_bpc > 0
    run = load_run(tmp_path / "run")
    learned = run.model.blocks[0].mixer.sharpness
    assert isinstance(run.model.blocks[0].mixer, SharpMixer)
    assert not torch.equal(learned, torch.ones_like(learned))  # it trained

    result = compare([sharp], seeds=1, budget="steps=2", out=tmp_path / "cmp", **QUIET)
    (config,) = result.configs
    assert (config.mixer, config.runs[0].status, config.runs[0].steps) == (
        "sharp dot",
        "trained",
        2,
    )
    assert json.loads((tmp_path / "cmp" / "results.json").read_text())["configs"][0]["mixer"] == (
        "sharp dot"
    )

    found = inspect_run(tmp_path / "run", out=tmp_path / "inspect", windows=2)
    assert found.kernels.read_bytes()[:4] == b"\x89PNG"
    profile = json.loads(found.profiles.read_text())["run (sharp)"]
    assert len(profile) == 2 and len(profile[0]) == 16
