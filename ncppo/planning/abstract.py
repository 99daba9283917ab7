"""Running the real training step without memory: fake tensors, FLOPs by phase, live bytes.

``FakeTensorMode`` gives every tensor a shape, dtype and device ("cpu") but no data, so the step of
:mod:`ncppo.step` runs unchanged at SDXL's 1024 px in seconds; CPU autocast gives the half-precision
dtypes of a mixed-precision run. Two things need help, both without FLOPs or memory:

- Python reads of a tensor's value (``int(t.max())`` in argument checks, ``bool(mask.any())`` in the
  diagnostics) have no value to read: they are answered with 0 / False (checks pass, diagnostics skip).
- The forward-mode derivative of ``group_norm`` (the NCP JVP) makes its zero tangent on the ``meta``
  device under fake tensors (a torch bug); such outputs are moved to the step's device.

FLOPs are counted by ``torch.utils.flop_counter.FlopCounterMode`` (its registry, plus the formula of
torch's CPU flash attention, which it lacks: the same as CUDA flash attention's). Memory is the peak of
the bytes of live tensor storages, tracked per storage as the step allocates and frees them.
"""

from __future__ import annotations

import contextlib
import weakref

import torch
from torch._subclasses.fake_tensor import FakeTensor, FakeTensorMode
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

from ncppo.flops import FlopCounterMode  # also registers the CPU flash-attention formulas

_aten = torch.ops.aten


class _FakeFixes(TorchDispatchMode):
    """Answers value reads with 0 / False and puts meta-device outputs on the fake device (module docstring)."""

    def __init__(self, device: torch.device):
        super().__init__()
        self.device = device

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func is _aten._local_scalar_dense.default:
            return False if args[0].dtype == torch.bool else 0
        out = func(*args, **(kwargs or {}))
        for t in tree_flatten(out)[0]:
            if isinstance(t, FakeTensor) and t.fake_device.type == "meta":
                t.fake_device = self.device
        return out


class LiveBytes(TorchDispatchMode):
    """The peak, over the ops run under it, of the bytes of the tensor storages they made that are still
    alive (a storage counts once, however many views; freed when its last reference goes). The storages of
    ``existing`` tensors (weights, inputs) are never counted, also when an op returns a view of one."""

    def __init__(self, existing=()):
        super().__init__()
        self.current = 0
        self.peak = 0
        self._refs: dict[int, weakref.ref] = {}
        for t in existing:
            storage = t.untyped_storage()
            self._refs[id(storage)] = weakref.ref(storage)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in tree_flatten(out)[0]:
            if isinstance(t, torch.Tensor):
                self._add(t.untyped_storage())
        return out

    def _add(self, storage) -> None:
        key = id(storage)
        if key in self._refs and self._refs[key]() is storage:
            return
        size = storage.nbytes()
        self._refs[key] = weakref.ref(storage, lambda _ref, k=key, n=size: self._free(k, n))
        self.current += size
        self.peak = max(self.peak, self.current)

    def _free(self, key: int, size: int) -> None:
        self._refs.pop(key, None)
        self.current -= size


class PhaseFlops:
    """FLOPs of one counter split by phase: ``policy`` and ``reference`` U-Net forwards (told apart by grad
    mode; the difference pass is one forward with grad, counted as ``policy``), ``encoder`` (everything else in
    the forward: the NCP encoder passes, the loss), ``backward``."""

    def __init__(self, unets):
        self.counter = FlopCounterMode(display=False)
        self.flops: dict[str, int] = {"policy": 0, "reference": 0, "encoder": 0, "backward": 0}
        self.phase = "encoder"
        self._last = 0
        self._handles = []
        for unet in unets:
            self._handles.append(unet.register_forward_pre_hook(self._enter))
            self._handles.append(unet.register_forward_hook(self._leave))

    def switch(self, phase: str) -> None:
        total = self.counter.get_total_flops()
        self.flops[self.phase] += total - self._last
        self._last, self.phase = total, phase

    def _enter(self, module, args):
        self.switch("policy" if torch.is_grad_enabled() else "reference")

    def _leave(self, module, args, output):
        self.switch("encoder")

    def close(self) -> dict[str, int]:
        self.switch(self.phase)
        for handle in self._handles:
            handle.remove()
        return dict(self.flops)


def to_fake(modules, mode: FakeTensorMode, device: str = "cpu") -> None:
    """Replace every parameter and buffer of ``modules`` (built on ``meta``) by a fake tensor on ``device``
    of the same shape, dtype and ``requires_grad``."""
    with mode:
        for module in modules:
            for m in module.modules():
                for name, p in list(m._parameters.items()):
                    if p is not None:
                        m._parameters[name] = torch.nn.Parameter(torch.empty(p.shape, dtype=p.dtype, device=device),
                                                                  requires_grad=p.requires_grad)
                for name, b in list(m._buffers.items()):
                    if b is not None:
                        m._buffers[name] = torch.empty(b.shape, dtype=b.dtype, device=device)


@contextlib.contextmanager
def abstract_execution(mode: FakeTensorMode, autocast_dtype: torch.dtype | None, device: str = "cpu"):
    """Inside: fake tensors with the fixes above, and CPU autocast to ``autocast_dtype`` (None: off)."""
    with mode, _FakeFixes(torch.device(device)), torch.autocast(device, dtype=autocast_dtype or torch.bfloat16,
                                                               enabled=autocast_dtype is not None):
        yield


def fake_mode() -> FakeTensorMode:
    return FakeTensorMode(allow_non_fake_inputs=True)
