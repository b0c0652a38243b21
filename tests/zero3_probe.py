"""One gloo rank builds a bf16 ZeRO-3 model whose zero.Init aims tensors made without a
device at `meta`, standing in for a GPU rank's CUDA generator, and says whether it starts
from the eager model's values and buffer dtypes, cast to bf16 as DeepSpeed casts a model
(tests/test_cuda_placement.py runs it: `python tests/zero3_probe.py`)."""

import os
import sys

import torch
import torch._dynamo  # noqa: F401  (imported lazily under zero.Init, it trips on its patched Tensor.__new__)

os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1")
os.environ.setdefault("MASTER_PORT", sys.argv[1] if len(sys.argv) > 1 else "29561")
import deepspeed  # noqa: E402
from deepspeed.runtime.zero import partition_parameters as pp  # noqa: E402

from leviathan.config import config_from_dict  # noqa: E402
from leviathan.model import Leviathan  # noqa: E402
from leviathan.parallel.deepspeed.zero3 import build_partitioned  # noqa: E402

wrap = pp.zero_wrapper_for_fp_tensor_constructor


def elsewhere(fn, target_fp_dtype, target_device):
    """zero.Init's factory wrapper, its device (when it sets one) another than the CPU's."""
    return wrap(fn, target_fp_dtype, None if target_device is None else torch.device("meta"))


pp.zero_wrapper_for_fp_tensor_constructor = elsewhere
deepspeed.init_distributed("gloo")
ffn = {"kind": "moe", "n_experts": 4, "top_k": 2, "expert_hidden_mult": 1.0, "balance": "loss_free"}
raw = {
    "model": {"vocab_size": 50, "block_size": 16, "n_layer": 2, "n_head": 2, "d_model": 16},
    "train": {"seq_len": 16, "precision": "bf16"},
    "parallel": {"engine": "deepspeed", "zero_stage": 3},
}
raw["model"]["ffn"] = ffn
cfg = config_from_dict(raw)
torch.manual_seed(0)
eager = Leviathan(cfg.model).to(torch.bfloat16)  # as DeepSpeed casts a bf16 model
torch.manual_seed(0)
sharded = build_partitioned(cfg, cfg.model, torch.device("cpu"))
for (name, want), got in zip(eager.named_buffers(), sharded.buffers(), strict=True):
    assert got.device.type == "cpu", f"{name} is not on the device"
    assert got.dtype == want.dtype, f"{name} is {got.dtype}, eager's {want.dtype}"
with deepspeed.zero.GatheredParameters(list(sharded.parameters())):
    for (name, want), got in zip(eager.named_parameters(), sharded.parameters(), strict=True):
        assert torch.equal(want, got.detach()), f"{name} differs from the eager model's"
print("SAME VALUES")
