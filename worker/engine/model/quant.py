"""int8 weight-only quantisation of the LLM (``engine.quantization: int8``), as the seed's engine.

Every linear layer of the decoder blocks and the LM head becomes an :class:`Int8Linear`: int8
weights with one float32 scale per output channel (symmetric, ``w ~= q * scale``; stored as uint8
``q + 128``, which the GEMVs convert to float32 in one instruction fewer), activations
stay in the model dtype. The vision tower, the embedding and the norms keep their dtype. Weight
bytes read per decode step fall from 2 to 1 per parameter, which is what decode is bound by.

The module computes ``x @ (q * scale).T + bias`` with float32 accumulation
(:func:`worker.engine.model.kernels.int8_linear`): a Triton kernel on CUDA, torch elsewhere. Its
reference is the same model with each weight replaced by ``q * scale`` (:func:`dequantize_llm`).
"""

from __future__ import annotations

import torch
from torch import nn

from .kernels import int8_linear, int8_weights, quantize_int8


class Int8Linear(nn.Module):
    """A linear layer with int8 weights ``qweight [out, in]`` (uint8 ``q + 128``,
    :func:`.kernels.store_int8`) and float32 ``scale [out]``.

    State dict entries are ``qweight``, ``scale`` (and ``bias``), so a quantised model's
    ``state_dict`` does not pass for a bf16 checkpoint.
    """

    def __init__(self, qweight: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor | None = None) -> None:
        super().__init__()
        self.in_features = qweight.shape[1]
        self.out_features = qweight.shape[0]
        self.register_buffer("qweight", qweight)
        self.register_buffer("scale", scale)
        self.register_buffer("bias", bias)

    @classmethod
    def from_linear(cls, linear: nn.Linear) -> Int8Linear:
        q, scale = quantize_int8(linear.weight.detach())
        bias = None if linear.bias is None else linear.bias.detach().clone()
        return cls(q, scale, bias)

    def dequantized_weight(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """``q * scale`` as a dense ``[out, in]`` matrix."""
        return (int8_weights(self.qweight) * self.scale[:, None]).to(dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        y = int8_linear(x.reshape(-1, shape[-1]), self.qweight, self.scale, self.bias)  # [M, out]
        return y.view(*shape[:-1], self.out_features)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}"


def llm_linear_names(model: nn.Module) -> list[str]:
    """Qualified names of the layers :func:`quantize_llm` converts: every ``nn.Linear`` of the
    decoder blocks (``transformer.h.N...``) and ``lm_head``."""
    return [name for name, module in model.named_modules()
            if isinstance(module, nn.Linear) and (name.startswith("transformer.h.") or name == "lm_head")]


@torch.no_grad()
def quantize_llm(model: nn.Module) -> int:
    """Replace the LLM's linear layers by :class:`Int8Linear` in place (one layer at a time, so
    the bf16 and int8 copies of only one layer coexist); returns how many were converted.
    Calling it again converts nothing."""
    names = llm_linear_names(model)
    for name in names:
        parent_name, _, attr = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, attr, Int8Linear.from_linear(getattr(parent, attr)))
        # the fast path's fused [w1 | w2] of the old weights (worker.engine.model.fast) goes too
        parent.__dict__.pop("_vlq_gate_up", None)
    return len(names)


def is_quantized(model: nn.Module) -> bool:
    """True when ``model`` holds any :class:`Int8Linear`."""
    return any(isinstance(m, Int8Linear) for m in model.modules())


@torch.no_grad()
def dequantize_llm(model: nn.Module, dtype: torch.dtype) -> None:
    """Turn every :class:`Int8Linear` of ``model`` back into an ``nn.Linear`` of ``dtype`` holding
    ``q * scale`` (computed in float32): the reference the int8 path is checked against."""
    for name, module in list(model.named_modules()):
        if not isinstance(module, Int8Linear):
            continue
        linear = nn.Linear(module.in_features, module.out_features, bias=module.bias is not None,
                           device=module.qweight.device, dtype=dtype)
        linear.weight.copy_(module.dequantized_weight(torch.float32))
        if module.bias is not None:
            linear.bias.copy_(module.bias)
        linear.requires_grad_(False)
        parent_name, _, attr = name.rpartition(".")
        setattr(model.get_submodule(parent_name) if parent_name else model, attr, linear)
