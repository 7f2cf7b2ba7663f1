"""The ``weight`` an OTQ layer shows: a dequantized, read-only view of its codes.

``OTQLinear``/``OTQConv2d`` are ``nn.Linear``/``nn.Conv2d`` subclasses, so peft, diffusers' LoRA loaders and
other tools that look for ``module.weight`` find one: a fresh float tensor dequantized from the packed codes on
every access. Reading it works like any tensor (its results are plain tensors). Writing into it cannot work:
the stored weight is the codes, and a write into a temporary copy would be silently lost. That is exactly what
peft's ``merge`` (diffusers' ``fuse_lora``) does (``base_layer.weight.data += delta``), so every in-place
operation on the view, ``.data = ...`` included, raises :class:`QuantizedWeightWriteError` naming the layer and
the alternatives.
"""

from __future__ import annotations

from typing import Any

import torch


__all__ = ["QuantizedWeightWriteError", "ReadOnlyWeight"]

_DATA = torch._C.TensorBase.__dict__["data"]
_INPLACE_DUNDERS = frozenset(
    {"__iadd__", "__isub__", "__imul__", "__itruediv__", "__ifloordiv__", "__imod__", "__ipow__", "__setitem__",
     "__iand__", "__ior__", "__ixor__", "__ilshift__", "__irshift__", "__imatmul__"}
)  # fmt: skip


class QuantizedWeightWriteError(RuntimeError):
    """A write into the dequantized view of an OTQ layer's weight (it would be lost; see module doc)."""


class ReadOnlyWeight(torch.Tensor):
    """A dequantized weight that refuses in-place writes. Build with :meth:`wrap`; ``layer`` names the owner."""

    layer: str

    @staticmethod
    def wrap(weight: torch.Tensor, layer: str) -> ReadOnlyWeight:
        view = weight.as_subclass(ReadOnlyWeight)
        view.layer = layer
        return view

    def _refuse(self, operation: str) -> QuantizedWeightWriteError:
        return QuantizedWeightWriteError(
            f"{getattr(self, 'layer', 'an OTQ layer')}: its weight is stored as packed codes and codebooks, so "
            f"`{operation}` on its dequantized view would be silently lost; refused. This is what fusing a LoRA "
            "(fuse_lora / peft merge) does: keep the LoRA unfused instead (it runs beside the quantized weight at "
            "the LoRA's own cost; set_adapters/disable_lora work as usual), or call model.dequantize(), fuse, "
            "and quantize again."
        )

    @classmethod
    def __torch_function__(cls, func: Any, types: Any, args: tuple = (), kwargs: dict | None = None) -> Any:
        kwargs = kwargs or {}
        name = getattr(func, "__name__", "")
        owner = args[0] if args else None
        if getattr(func, "__self__", None) is _DATA:  # the `.data` property
            if name == "__get__":
                return owner  # `.data` of the view is the view: writes through it are refused too
            raise owner._refuse(".data = ...")
        if isinstance(owner, ReadOnlyWeight):
            if name == "requires_grad_":
                requested = args[1] if len(args) > 1 else kwargs.get("requires_grad", True)
                if not requested:
                    return owner  # already frozen: the codes are not trainable
                raise owner._refuse("requires_grad_(True)")
            if name in _INPLACE_DUNDERS or (name.endswith("_") and not name.startswith("_")):
                raise owner._refuse(name)
        with torch._C.DisableTorchFunctionSubclass():
            result = func(*args, **kwargs)
        if isinstance(result, ReadOnlyWeight):  # ops that return their input (e.g. .float() of float32)
            return result.as_subclass(torch.Tensor)
        return result
