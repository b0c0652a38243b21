"""Exact BPC: the windowed evaluation equals scoring the stream in one pass."""

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from leviathan.config import config_from_dict
from leviathan.model import Leviathan
from leviathan.train.evaluate import evaluate, unigram_bpc


def test_windowed_eval_equals_direct_nll_over_the_whole_stream():
    cfg = config_from_dict(
        {
            "model": {"vocab_size": 40, "block_size": 64, "n_layer": 1, "d_model": 16, "n_head": 2},
            "train": {"seq_len": 64},
        }
    )
    torch.manual_seed(0)
    model = Leviathan(cfg.model)
    tokens = np.random.default_rng(0).integers(0, 40, size=50).astype(np.uint16)
    characters = 137
    result = evaluate(model, tokens, seq_len=8, batch_size=3, characters=characters)

    # the oracle: each window of 8 predictions scored on its own, all 49 targets once
    nll = 0.0
    for start in range(0, 49, 8):
        x = torch.tensor(tokens[start : min(start + 8, 49)], dtype=torch.long)[None]
        y = torch.tensor(tokens[start + 1 : min(start + 9, 50)], dtype=torch.long)[None]
        logits, _ = model(x)
        nll += F.cross_entropy(logits[0], y[0], reduction="sum").item()
    assert result.tokens == 49
    assert result.loss == pytest.approx(nll / 49, rel=1e-6)
    assert result.bpc == pytest.approx(nll / (characters * math.log(2)), rel=1e-6)


def test_unigram_baseline_by_hand():
    train = np.array([0, 0, 1, 2], dtype=np.uint16)
    val = np.array([2, 0, 1], dtype=np.uint16)
    # add-one counts over vocab 4: [3, 2, 2, 1] / 8; val targets after the first: 0, 1
    expected = -(math.log(3 / 8) + math.log(2 / 8)) / (5 * math.log(2))
    assert unigram_bpc(train, val, vocab_size=4, characters=5) == pytest.approx(expected)
