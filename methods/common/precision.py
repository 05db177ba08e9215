"""Mixed precision, memory format and compilation: one set of options shared by every method.

Every method's config (and the harness's common segmenter) carries the same three fields,
from :class:`PrecisionOptions`, so one override reaches all of them (``bf16=true`` on the
command line sets it for every selected method):

* ``bf16`` (default off): every network forward, in training and at inference, runs under
  ``torch.autocast(dtype=torch.bfloat16)`` on the method's device (CUDA; CPU autocast works
  too and is what the tests use). Parameters, optimiser state and gradients stay float32;
  bf16 keeps float32's exponent range, so no loss scaling (GradScaler) is needed.
  **Numerics-changing**: matmuls / convolutions round their inputs to 8 mantissa bits.
  :meth:`Precision.forward` casts the forward's outputs back to float32 at once, so losses
  (soft-max, cross-entropy, BCE), CAM normalisation, PAR, random walks and diffusion all run
  in float32, and what a method returns to the harness (CAMs, logits) is float32.
* ``channels_last`` (default off): convolution weights and the 4-D inputs of the forward are
  stored NHWC, which cuDNN's tensor-core kernels prefer. It pays for convolution-heavy
  networks (DeepLab-V2's ResNet, AD-CAM's Conformer CNN branch, MiT's overlapping patch
  embeddings); for a plain ViT only the patch embedding is a convolution. Numerically
  equivalent up to float rounding (a different kernel may sum in another order).
* ``compile`` (default off): the *training* forward goes through ``torch.compile``
  (inference stays eager: its shapes vary from image to image, which would recompile).
  Equivalent up to float rounding (fused kernels); the first steps pay the compilation.
  Never on by default, on CPU or elsewhere.
"""

from __future__ import annotations

import contextlib
import dataclasses
import weakref
from dataclasses import dataclass, field
from typing import Any, Callable

import torch
from torch import nn


@dataclass
class PrecisionOptions:
    """Mixin of the shared config fields (see the module docstring). A method's config
    inherits it next to :class:`methods.base.MethodConfig`."""

    bf16: bool = False  # bf16 autocast of every forward (training and inference); numerics-changing
    channels_last: bool = False  # NHWC convolutions; equivalent up to float rounding
    compile: bool = False  # torch.compile of the training forward; equivalent up to float rounding


def autocast(device: torch.device | str, enabled: bool) -> contextlib.AbstractContextManager:
    """``torch.autocast`` to bfloat16 on ``device``'s type when ``enabled``, else a no-op."""
    device_type = torch.device(device).type
    if not enabled:
        return contextlib.nullcontext()
    return torch.autocast(device_type, dtype=torch.bfloat16)


def to_float32(value: Any) -> Any:
    """``value`` with every bf16 / fp16 tensor cast to float32, through tuples (named ones
    too), lists, dicts and dataclass instances; other values (float32 / float64 / integer
    tensors, ints, None) are returned unchanged. The cast is differentiable."""
    if isinstance(value, torch.Tensor):
        return value.float() if value.dtype in (torch.bfloat16, torch.float16) else value
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        changes = {f.name: to_float32(getattr(value, f.name)) for f in dataclasses.fields(value) if f.init}
        return dataclasses.replace(value, **changes)
    if isinstance(value, tuple):
        items = [to_float32(v) for v in value]
        return type(value)(*items) if hasattr(value, "_fields") else tuple(items)
    if isinstance(value, list):
        return [to_float32(v) for v in value]
    if isinstance(value, dict):
        return {k: to_float32(v) for k, v in value.items()}
    return value


@dataclass(frozen=True)
class Precision:
    """The options of one method instance on one device, and the few operations that apply
    them. Build it with :meth:`of`."""

    device: torch.device
    bf16: bool = False
    channels_last: bool = False
    compile: bool = False
    # compiled wrappers by module, so that a loop may ask for its forward at every step
    _compiled: weakref.WeakKeyDictionary = field(default_factory=weakref.WeakKeyDictionary, repr=False, compare=False)

    @classmethod
    def of(cls, options: Any, device: torch.device) -> "Precision":
        """From any config with the :class:`PrecisionOptions` fields (missing ones: off).

        Raises ValueError when ``bf16`` is asked on a CUDA device without bf16 support (GPUs
        before Ampere, such as the papers' TITAN X / V100, would emulate it slowly)."""
        device = torch.device(device)
        prec = cls(device, bool(getattr(options, "bf16", False)), bool(getattr(options, "channels_last", False)),
                   bool(getattr(options, "compile", False)))
        if prec.bf16 and device.type == "cuda" and torch.cuda.is_available() and not torch.cuda.is_bf16_supported():
            raise ValueError(
                f"bf16=true: the CUDA device {torch.cuda.get_device_name(device)} has no native bfloat16 "
                "(it needs compute capability >= 8.0, Ampere or newer); run with bf16=false"
            )
        return prec

    def autocast(self) -> contextlib.AbstractContextManager:
        """The bf16 autocast context of this device (a no-op when ``bf16`` is off)."""
        return autocast(self.device, self.bf16)

    def module(self, net: nn.Module) -> nn.Module:
        """``net`` with its 4-D parameters / buffers in channels-last format when the option
        is on (in place; returned for chaining). Later ``.to(device)`` calls and
        ``load_state_dict`` keep the format."""
        if self.channels_last:
            net.to(memory_format=torch.channels_last)
        return net

    def input(self, x: Any) -> Any:
        """A 4-D tensor made channels-last when the option is on; anything else unchanged."""
        if self.channels_last and isinstance(x, torch.Tensor) and x.dim() == 4:
            return x.contiguous(memory_format=torch.channels_last)
        return x

    def forward(self, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        """``fn(*args, **kwargs)`` under the autocast context with 4-D tensor arguments in the
        chosen memory format; reduced-precision outputs come back as float32
        (:func:`to_float32`), so whatever follows (losses, normalisation) runs in float32."""
        args = tuple(self.input(a) for a in args)
        kwargs = {k: self.input(v) for k, v in kwargs.items()}
        with self.autocast():
            out = fn(*args, **kwargs)
        return to_float32(out) if self.bf16 else out

    def train_forward(self, net: nn.Module) -> Callable[..., Any]:
        """What the training loop calls for its forward: ``torch.compile(net)`` when
        ``compile`` is on (sharing ``net``'s parameters; checkpoints keep saving ``net``),
        else ``net`` itself. The compiled wrapper is made once per module and reused."""
        if not self.compile:
            return net
        if net not in self._compiled:
            self._compiled[net] = torch.compile(net)
        return self._compiled[net]
