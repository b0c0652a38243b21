"""Fake CUDA on a CPU-only build: tensors that say `cuda:0`, with shapes, dtypes and devices
but no data, so a model's forward runs its CUDA branches and a tensor made without a device
(a CPU tensor) raises `FakeTensorDeviceMismatchError` where it meets the model's.

`FakeTensorMode` makes fake CUDA tensors on this build and runs their ops' meta kernels,
but three things in a CPU build reach for the CUDA runtime and need a shim:

1. The autograd graph. Recording an op on a parameter that requires grad builds its
   `AccumulateGrad`, whose `InputMetadata` asks the CUDA device-guard implementation for
   the device's current stream: `getDeviceGuardImpl` (c10/core/impl/DeviceGuardImplInterface
   .h) throws "PyTorch is not linked with support for cuda devices" inside a C++ constructor
   and the process aborts (the token embedding, or autocast's cast of a weight).
   `materialise` turns `requires_grad` off: forward and generation only, no backward.
2. Python bindings that take a CUDA `OptionalDeviceGuard` before they dispatch: indexing
   (`THPVariable_getitem` / `setitem`), `contiguous`, `copy_` and everything built on
   `dispatch_to` (`to`, `cuda`, `float`, `half`, ...). They raise the same message (a
   catchable RuntimeError). `GuardFreeBindings` sends them to the same aten ops through
   `torch.ops`, which has no guard.
3. `torch.autocast("cuda")` disables itself when `torch.cuda.is_available()` is False and
   asks `torch.cuda.is_bf16_supported()` (which would initialise CUDA) for bf16.
   `cuda_autocast` answers both as a GPU would, only while the autocast is built.

What stays out of reach: `Module.to(dtype)` / `.half()` of a materialised model fails
(FakeTensorMode holds weak references to its tensors, so `swap_tensors` refuses them):
cast on `meta` before `materialise`. Ops that need values (`.item()`, `.tolist()`) have
none (MoE's split sizes): dense FFNs only. Backward: see 1.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from typing import Any
from unittest import mock

import torch
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.overrides import TorchFunctionMode

aten = torch.ops.aten
Tensor = torch.Tensor


def _basic_view(t: Tensor, index: Any) -> tuple[Tensor, list[tuple[int, Any]]]:
    """The view `t[index]` takes for its ints, slices, None and `...`, and the (dim, index)
    pairs of its tensor or list entries (advanced indexing, applied after)."""
    index = index if isinstance(index, tuple) else (index,)
    real = sum(1 for i in index if i is not None and i is not Ellipsis)
    out, dim, advanced = t, 0, []
    for i in index:
        if i is Ellipsis:
            dim += t.dim() - real
        elif i is None:
            out, dim = aten.unsqueeze.default(out, dim), dim + 1
        elif isinstance(i, bool):
            raise TypeError(f"fake_cuda indexing: boolean index {index!r} not supported")
        elif isinstance(i, (int, torch.SymInt)):
            out = aten.select.int(out, dim, i)
        elif isinstance(i, slice):
            step = 1 if i.step is None else i.step
            out, dim = aten.slice.Tensor(out, dim, i.start, i.stop, step), dim + 1
        elif isinstance(i, (Tensor, list)):
            advanced, dim = [*advanced, (dim, i)], dim + 1
        else:
            raise TypeError(f"fake_cuda indexing: {type(i).__name__} index not supported")
    return out, advanced


def _index_list(view: Tensor, advanced: list[tuple[int, Any]]) -> list[Tensor | None]:
    indices: list[Tensor | None] = [None] * (max(d for d, _ in advanced) + 1)
    for d, i in advanced:
        indices[d] = i if isinstance(i, Tensor) else torch.tensor(i, device=view.device)
    return indices


def _getitem(self: Tensor, index: Any) -> Tensor:
    view, advanced = _basic_view(self, index)
    return aten.index.Tensor(view, _index_list(view, advanced)) if advanced else view


def _setitem(self: Tensor, index: Any, value: Any) -> None:
    view, advanced = _basic_view(self, index)
    if advanced:
        value = torch.as_tensor(value, dtype=self.dtype, device=self.device)
        aten.index_put_.default(view, _index_list(view, advanced), value)
    elif isinstance(value, Tensor):
        aten.copy_.default(view, value)
    else:
        aten.fill_.Scalar(view, value)


def _to(self: Tensor, *args: Any, **kwargs: Any) -> Tensor:
    copy = kwargs.pop("copy", False)
    device, dtype, non_blocking, memory_format = torch._C._nn._parse_to(*args, **kwargs)
    return aten.to.dtype_layout(
        self,
        dtype=dtype or self.dtype,
        layout=self.layout,
        device=device or self.device,
        non_blocking=non_blocking,
        copy=copy,
        memory_format=memory_format,
    )


def _cast(dtype: torch.dtype) -> Callable[..., Tensor]:
    def cast(self: Tensor, memory_format: torch.memory_format = torch.preserve_format) -> Tensor:
        return _to(self, dtype, memory_format=memory_format)

    return cast


CASTS = {
    "float": torch.float32,
    "double": torch.float64,
    "half": torch.float16,
    "bfloat16": torch.bfloat16,
    "long": torch.int64,
    "int": torch.int32,
    "bool": torch.bool,
}

REROUTED: dict[Callable, Callable] = {
    Tensor.__getitem__: _getitem,
    Tensor.__setitem__: _setitem,
    Tensor.to: _to,
    Tensor.cuda: lambda self, device=None, non_blocking=False: _to(
        self, device or "cuda", non_blocking=non_blocking
    ),
    Tensor.cpu: lambda self: _to(self, "cpu"),
    Tensor.contiguous: lambda self, memory_format=torch.contiguous_format: aten.contiguous.default(
        self, memory_format=memory_format
    ),
    Tensor.copy_: lambda self, src, non_blocking=False: aten.copy_.default(self, src, non_blocking),
    **{getattr(Tensor, name): _cast(dtype) for name, dtype in CASTS.items()},
}


class GuardFreeBindings(TorchFunctionMode):
    """Shim 2: the tensor methods whose Python binding takes a CUDA device guard, run as
    the aten ops they dispatch to (same semantics, no guard)."""

    def __torch_function__(
        self, func: Callable, types: Any, args: tuple = (), kwargs: dict | None = None
    ) -> Any:
        return REROUTED.get(func, func)(*args, **(kwargs or {}))


@contextlib.contextmanager
def fake_cuda() -> Iterator[FakeTensorMode]:
    """Fake tensors, `device="cuda"` included, with the guarded bindings rerouted.
    Non-fake inputs are allowed so that `materialise` can read a `meta` module's shapes."""
    with FakeTensorMode(allow_non_fake_inputs=True) as mode, GuardFreeBindings():
        yield mode


def materialise(module: torch.nn.Module) -> torch.nn.Module:
    """Shim 1: a module built on `meta` (cast there too), as fake CUDA tensors that require
    no grad (call inside `fake_cuda()`, on a module built outside it: a module built under
    FakeTensorMode holds fake `meta` tensors, which `to_empty` cannot swap)."""
    return module.to_empty(device="cuda").requires_grad_(False)


def cuda_autocast(dtype: torch.dtype) -> torch.autocast:
    """Shim 3: `torch.autocast("cuda", dtype)` as on a GPU that supports `dtype`."""
    with (
        mock.patch("torch.cuda.is_available", lambda: True),
        mock.patch("torch.cuda.is_bf16_supported", lambda *args, **kwargs: True),
    ):
        return torch.autocast("cuda", dtype=dtype)
