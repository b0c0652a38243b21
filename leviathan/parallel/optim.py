"""AdamW with weight decay on matrix weights only."""

import torch
from torch import nn

from leviathan.model.mixers import Generator


def param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """Decay the weights of Linear layers and of the filter generators (matrices too:
    decay pulls a generated filter towards the static one, as fairseq's dynamic
    convolutions decay theirs); spare norms, biases, embeddings and lag kernels.

    The tied output head is the token embedding, so it is spared too: decaying an
    embedding shrinks rare tokens towards zero for no regularising benefit.
    """
    decay = {id(m.weight) for m in model.modules() if isinstance(m, nn.Linear)}
    decay |= {id(p) for m in model.modules() if isinstance(m, Generator) for p in (m.w0, m.w1)}
    decay -= {id(m.weight) for m in model.modules() if isinstance(m, nn.Embedding)}
    params = [p for p in model.parameters() if p.requires_grad]
    return [
        {
            "name": "decay",
            "params": [p for p in params if id(p) in decay],
            "weight_decay": weight_decay,
        },
        {
            "name": "no_decay",
            "params": [p for p in params if id(p) not in decay],
            "weight_decay": 0.0,
        },
    ]


def build_adamw(model: nn.Module, lr: float, weight_decay: float, betas: tuple[float, float]):
    return torch.optim.AdamW(param_groups(model, weight_decay), lr=lr, betas=betas)
