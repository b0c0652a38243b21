"""CUDA placement checks a CPU-only build can run (tests/test_cuda_placement.py).

`deepspeed.zero.Init` fills in `device=` on every tensor factory called without one, so
under ZeRO-3 on a GPU whatever a module makes at construction lands on the rank's GPU.
`zero_init_factories(device)` patches the same factories the same way, with a second
device a CPU build has (`meta`); `single_device()` raises on the first op whose tensor
inputs span two devices, which is where such a tensor meets the CPU ones.
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Iterator

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

# the factories deepspeed 0.19's zero.Init wraps (partition_parameters.py)
FACTORIES = ("tensor", "empty", "zeros", "ones", "full", "arange", "eye", "randn")


@contextlib.contextmanager
def zero_init_factories(device: str) -> Iterator[None]:
    """Factories called without `device=` make their tensor on `device`, as in zero.Init."""
    originals = {name: getattr(torch, name) for name in FACTORIES}

    def wrap(fn):
        @functools.wraps(fn)
        def made_on_device(*args, **kwargs):
            if kwargs.get("device") is None:
                kwargs["device"] = device
            return fn(*args, **kwargs)

        return made_on_device

    try:
        for name, fn in originals.items():
            setattr(torch, name, wrap(fn))
        yield
    finally:
        for name, fn in originals.items():
            setattr(torch, name, fn)


class MixedDevices(RuntimeError):
    """One op's tensor inputs live on two devices."""


class _SingleDevice(TorchDispatchMode):
    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        flat, _ = tree_flatten((args, kwargs or {}))
        # torch itself lets a 0-dim CPU tensor meet a tensor of any device (a scalar)
        devices = {
            t.device
            for t in flat
            if isinstance(t, torch.Tensor) and not (t.dim() == 0 and t.device.type == "cpu")
        }
        if len(devices) > 1:
            raise MixedDevices(f"{func}: inputs on {sorted(map(str, devices))}")
        return func(*args, **(kwargs or {}))


def single_device() -> _SingleDevice:
    """A dispatch mode that raises `MixedDevices` at the first op mixing two devices."""
    return _SingleDevice()
