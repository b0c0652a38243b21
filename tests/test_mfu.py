"""MFU: the training-FLOPs formula, the peak table and its override."""

import pytest

from leviathan.config import config_from_dict
from leviathan.errors import ConfigError
from leviathan.train import mfu


def test_achieved_flops_is_three_forward_passes():
    assert mfu.achieved_flops(2e6, 1000.0) == 6e9


def test_throughput_record():
    record = mfu.throughput(1000.0, 2e6, None)
    assert record == {"flops_per_s": 6e9}
    assert mfu.postfix(record) == {"gflop_s": "6.0"}
    record = mfu.throughput(1000.0, 2e6, 12e9, world_size=2)
    assert record["mfu"] == pytest.approx(0.25)  # 6 GFLOP/s of 2 x 12
    assert mfu.postfix(record) == {"mfu": "25.0%"}


@pytest.mark.parametrize(
    "name, precision, peak",
    [
        ("NVIDIA H100 80GB HBM3", "bf16", 989e12),
        ("NVIDIA H100 PCIe", "bf16", 756e12),
        ("NVIDIA H100 NVL", "fp32", 60e12),
        ("NVIDIA H200", "bf16", 989e12),
        ("NVIDIA A100-SXM4-80GB", "bf16", 312e12),
        ("NVIDIA A100-PCIE-40GB", "fp32", 19.5e12),
        ("NVIDIA GeForce RTX 3090", "bf16", None),
        ("cpu", "fp32", None),
    ],
)
def test_peak_table_lookup(name, precision, peak):
    assert mfu.lookup_peak(name, precision) == peak


def test_override_wins_and_cpu_has_no_peak():
    assert mfu.device_name("cpu") == "cpu"
    assert mfu.peak_flops("cpu", "fp32") is None
    assert mfu.peak_flops("cpu", "bf16", override=1e12) == 1e12


def test_peak_flops_config_key():
    assert config_from_dict({"train": {"peak_flops": 989e12}}).train.peak_flops == 989e12
    assert config_from_dict({}).train.peak_flops is None
    with pytest.raises(ConfigError, match=r"train\.peak_flops: must be positive"):
        config_from_dict({"train": {"peak_flops": 0}})
