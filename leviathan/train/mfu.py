"""Model FLOPs utilisation (MFU): achieved training FLOP/s against the device's peak.

Training FLOPs per token are taken as 3x the forward FLOPs (`Leviathan.flops_per_token`):
the backward pass costs about twice the forward (the 6N rule of thumb, N active parameters,
plus attention). Achieved FLOP/s = 3 * forward FLOPs/token * tokens/s, where tokens/s is
the global throughput (all ranks); MFU divides it by the summed peak of the devices.

Peaks are dense (no 2:4 sparsity) tensor-core figures from NVIDIA's data sheets, per
precision: `bf16` for bf16 autocast, `fp16` for DeepSpeed's fp16 (the same dense tensor-core
rate as bf16 on these parts), `fp32` for plain fp32 matmuls (torch's default keeps
TF32 off, so fp32 runs at the non-tensor-core rate). `train.peak_flops` (per device, in
FLOP/s) overrides the table, for a device it does not know or a clock it gets wrong.
"""

from __future__ import annotations

from typing import Any

import torch

# (substring of torch.cuda.get_device_name(), {precision: peak FLOP/s per device}).
# The first match wins, so the more specific names come first ("H100 PCIe" before "H100").
PEAK_FLOPS: tuple[tuple[str, dict[str, float]], ...] = (
    ("H100 NVL", {"bf16": 835e12, "fp16": 835e12, "fp32": 60e12}),
    ("H100 PCIe", {"bf16": 756e12, "fp16": 756e12, "fp32": 51e12}),
    ("H100", {"bf16": 989e12, "fp16": 989e12, "fp32": 67e12}),  # SXM5 ("H100 80GB HBM3")
    ("H200 NVL", {"bf16": 835e12, "fp16": 835e12, "fp32": 60e12}),
    ("H200", {"bf16": 989e12, "fp16": 989e12, "fp32": 67e12}),  # SXM; also matches GH200
    ("A100", {"bf16": 312e12, "fp16": 312e12, "fp32": 19.5e12}),  # SXM4 and PCIe alike
)

TRAINING_FLOPS_FACTOR = 3  # forward + backward (about twice the forward)


def device_name(device: torch.device | str) -> str:
    """`torch.cuda.get_device_name` for a CUDA device, else the device type ("cpu")."""
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return device.type


def lookup_peak(name: str, precision: str) -> float | None:
    """The table's peak FLOP/s for a device named `name` at `precision`, or None."""
    lowered = name.lower()
    for key, peaks in PEAK_FLOPS:
        if key.lower() in lowered:
            return peaks.get(precision)
    return None


def peak_flops(
    device: torch.device | str, precision: str, override: float | None = None
) -> float | None:
    """Peak FLOP/s of one `device` at `precision`: `override` when given, else the table's
    (None for a CPU or an unknown GPU)."""
    if override is not None:
        return float(override)
    return lookup_peak(device_name(device), precision)


def achieved_flops(forward_flops_per_token: float, tokens_per_s: float) -> float:
    """Training FLOP/s: 3 x forward FLOPs per token x tokens per second."""
    return TRAINING_FLOPS_FACTOR * forward_flops_per_token * tokens_per_s


def throughput(
    tokens_per_s: float,
    forward_flops_per_token: float,
    peak: float | None,
    world_size: int = 1,
) -> dict[str, float]:
    """Metrics for one step: `flops_per_s` (achieved, all ranks) and, when the peak of
    one device is known, `mfu` (a fraction of `world_size` such peaks)."""
    achieved = achieved_flops(forward_flops_per_token, tokens_per_s)
    record = {"flops_per_s": achieved}
    if peak:
        record["mfu"] = achieved / (peak * world_size)
    return record


def postfix(record: dict[str, Any]) -> dict[str, str]:
    """Progress-bar fields: MFU when known, else achieved GFLOP/s."""
    if "mfu" in record:
        return {"mfu": f"{100 * record['mfu']:.1f}%"}
    return {"gflop_s": f"{record['flops_per_s'] / 1e9:.1f}"}
