"""The serving path of :class:`QwenVL`: the same weights and answers, fewer and fused kernels.

:class:`FastQwenVL` wraps a loaded model and speaks the same model API (``encode_images``,
``setup_cache``, ``prefill``, ``decode``; docs/architecture.md), so the engine takes either.
What differs from the eager methods of :mod:`.qwen_vl` and :mod:`.decoder`:

- A decoding layer is seven launches (:mod:`.kernels`): RMSNorm fused with the residual add,
  ``c_attn``, one kernel for rotary + logn + the KV-cache write + attention (split over the row,
  combined by the last program of each head), ``c_proj``, RMSNorm + add, the MLP's ``w1`` and
  ``w2`` as one matrix (views of one tensor, made once) with ``w1 * silu(w2)`` in its epilogue,
  ``c_proj``. The linear layers are one Triton GEMV kernel (int8 or model-dtype weights, fixed
  tiles per shape, split-K for the narrow ones, the partial sums added by the last program of
  each tile; int8 at one row: the FMA GEMV, ``kernels.INT8_GEMV_BY_SHAPE``);
  prefill uses cuBLAS and a separate gate kernel (int8: the Triton kernel with matmul tiles).
  Decoding with int8 weights on the CUDA GEMV (1 and 2 rows) takes five: each RMSNorm runs inside
  the GEMV that reads its output, each residual add inside the GEMV before it
  (:meth:`FastQwenVL._decode_layers`, :data:`.kernels.NORM_IN_GEMV`).
- Decode attention reads the static cache in place, each row up to its own length read from
  device memory: no per-step gather, no host-side length, so one CUDA graph per batch size
  serves every length. Graphs for batch sizes ``1 .. max_batch_size`` are captured by
  :meth:`FastQwenVL.setup_cache` while the cache is still empty; a decode call replays the graph
  of its batch size after copying its three input vectors in.
- Prefill attention is ``scaled_dot_product_attention`` (flash) over the prompt's own rotated
  keys and values (written to the cache by the same kernel). Prompts of up to
  :data:`PREFILL_GRAPH_MAX` tokens replay a graph per padded length (multiples of 32), and vision
  batches of up to :data:`VISION_GRAPH_MAX` images one graph per batch size: both are
  launch-bound without.
- int8 weight-only layers (:mod:`.quant`) run :func:`.kernels.int8_linear`.

On a CPU every kernel is its torch version and no graph is captured; the arithmetic (and the
order of roundings) follows the eager model, so greedy answers are the same.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from producer.errors import ConfigError

from . import kernels
from .decoder import MLP, ntk_alpha, rotary_inv_freq
from .quant import Int8Linear
from .qwen_vl import QwenVL


@dataclass
class Dense:
    """A plain weight (and bias) for :func:`linear`, without ``nn.Linear``'s allocation."""

    weight: torch.Tensor
    bias: torch.Tensor | None = None


def linear(x: torch.Tensor, layer, *, norm: tuple[torch.Tensor, float] | None = None,
           residual: torch.Tensor | None = None) -> torch.Tensor:
    """``x [M, in]`` through an ``nn.Linear``, :class:`Dense` or :class:`Int8Linear` -> ``[M, out]``;
    ``norm`` (``(weight, eps)``): x through the decoder's RMSNorm first; ``residual`` ``[M, out]``:
    added to the result (:func:`.kernels.norm_linear`)."""
    if norm is not None or residual is not None:
        scale = layer.scale if isinstance(layer, Int8Linear) else None
        return kernels.norm_linear(x, _weight(layer), scale, layer.bias, norm=norm, residual=residual)
    if isinstance(layer, Int8Linear):
        return kernels.int8_linear(x, layer.qweight, layer.scale, layer.bias)
    return kernels.dense_linear(x, layer.weight, layer.bias)


def gated(x: torch.Tensor, layer, *, norm: tuple[torch.Tensor, float] | None = None) -> torch.Tensor:
    """``x [M, in]`` (through the decoder's RMSNorm first, with ``norm``) through a fused
    ``[w1 | w2]`` layer (:func:`fused_gate_up`), then the MLP's gate -> ``w1(x) * silu(w2(x))``
    ``[M, F]`` (one GEMV when decoding)."""
    scale = layer.scale if isinstance(layer, Int8Linear) else None
    return kernels.gated_linear(x, _weight(layer), scale, layer.bias, norm=norm)


def _weight(layer) -> torch.Tensor:
    return layer.qweight if isinstance(layer, Int8Linear) else layer.weight


def fused_gate_up(mlp: MLP):
    """``w1`` and ``w2`` of ``mlp`` as one ``[2F, in]`` layer whose rows ``:F`` are ``w1``.

    Made once: ``w1`` and ``w2`` are re-pointed at views of the fused tensor, so the model keeps
    its state-dict names, its eager forward and its memory size. A later call returns the same
    fused layer while the views still hold (a quantisation in between makes a new one).
    """
    cached = mlp.__dict__.get("_vlq_gate_up")  # in __dict__: not a submodule, not in state_dict
    if cached is not None and _still_fused(cached, mlp):
        return cached
    w1, w2 = mlp.w1, mlp.w2
    width = w1.out_features
    if isinstance(w1, Int8Linear) and isinstance(w2, Int8Linear):
        q = torch.cat([w1.qweight, w2.qweight])  # [2F, in]
        scale = torch.cat([w1.scale, w2.scale])
        bias = None if w1.bias is None else torch.cat([w1.bias, w2.bias])
        fused = Int8Linear(q, scale, bias)
        for part, rows in ((w1, slice(0, width)), (w2, slice(width, 2 * width))):
            part.qweight, part.scale = q[rows], scale[rows]
            if bias is not None:
                part.bias = bias[rows]
    elif isinstance(w1, nn.Linear) and isinstance(w2, nn.Linear):
        weight = torch.cat([w1.weight.detach(), w2.weight.detach()])  # [2F, in]
        bias = None if w1.bias is None else torch.cat([w1.bias.detach(), w2.bias.detach()])
        fused = Dense(weight, bias)
        for part, rows in ((w1, slice(0, width)), (w2, slice(width, 2 * width))):
            part.weight = nn.Parameter(weight[rows], requires_grad=False)
            if bias is not None:
                part.bias = nn.Parameter(bias[rows], requires_grad=False)
    else:
        raise ConfigError(f"cannot fuse MLP layers of types {type(w1).__name__} and {type(w2).__name__}")
    mlp.__dict__["_vlq_gate_up"] = fused
    return fused


def _still_fused(fused, mlp: MLP) -> bool:
    if isinstance(fused, Int8Linear):
        mine = [getattr(mlp.w1, "qweight", None), getattr(mlp.w2, "qweight", None)]
        whole = fused.qweight
    else:
        mine = [getattr(mlp.w1, "weight", None), getattr(mlp.w2, "weight", None)]
        whole = fused.weight
    if any(t is None for t in mine):
        return False
    half = mine[0].shape[0]
    return mine[0].data_ptr() == whole.data_ptr() and mine[1].data_ptr() == whole[half:].data_ptr()


@dataclass
class _LayerRefs:
    """What one decoder layer's fast forward reads."""

    ln_1: torch.Tensor
    c_attn: object
    c_proj: object
    ln_2: torch.Tensor
    gate_up: object
    down: object
    k: torch.Tensor  # [rows, H, max_seq_len, D]
    v: torch.Tensor


class FastQwenVL:
    """``model``'s serving path (see the module docstring). ``cuda_graphs`` captures graphs when
    the model is on a CUDA device and Triton is available."""

    def __init__(self, model: QwenVL, *, cuda_graphs: bool = True) -> None:
        llm = model.args.llm
        if llm.rotary_dim != llm.head_dim:
            raise ConfigError(f"the fast path rotates whole heads; rotary_pct {llm.rotary_pct} is not supported")
        self.model = model
        self.args = model.args
        self.cuda_graphs = cuda_graphs
        self._decode_graphs: dict[int, _Graph] = {}
        self._prefill_graphs: dict[int, _Graph] = {}
        self._vision_graphs: dict[int, _Graph] = {}
        self._pools: dict[str, object] = {}
        self._layers: list[_LayerRefs] = []
        kernels.use_card_tiles(self.device)

    @property
    def image_tokens(self) -> int:
        return self.model.image_tokens

    @property
    def device(self) -> torch.device:
        return self.model.lm_head.qweight.device if isinstance(self.model.lm_head, Int8Linear) \
            else self.model.lm_head.weight.device

    @property
    def graphs_enabled(self) -> bool:
        """Whether decode, short prefills and small vision batches replay CUDA graphs."""
        return self.cuda_graphs and self.device.type == "cuda" and kernels.triton is not None

    # -- setup -----------------------------------------------------------------------------------

    @torch.no_grad()
    def setup_cache(self, max_batch_size: int, max_seq_len: int) -> None:
        """Allocate the model's static KV cache (as :meth:`QwenVL.setup_cache`), gather each
        layer's weights (fusing ``w1``/``w2`` once) and capture the decode graphs."""
        self.model.setup_cache(max_batch_size, max_seq_len)
        decoder = self.model.transformer
        self._layers = [
            _LayerRefs(block.ln_1.weight, block.attn.c_attn, block.attn.c_proj, block.ln_2.weight,
                       fused_gate_up(block.mlp), block.mlp.c_proj, block.attn.kv_cache.k, block.attn.kv_cache.v)
            for block in decoder.h
        ]
        self._decode_graphs, self._prefill_graphs = {}, {}
        if self.graphs_enabled:
            self._pools = {kind: torch.cuda.graph_pool_handle() for kind in ("decode", "prefill", "vision")}
            with torch.inference_mode():
                for batch in range(max_batch_size, 0, -1):  # the largest first: the others reuse its memory
                    self._decode_graphs[batch] = self._capture_decode(batch)

    # -- the model API ---------------------------------------------------------------------------

    @torch.inference_mode()
    def encode_images(self, pixels: torch.Tensor) -> torch.Tensor:
        """As :meth:`QwenVL.encode_images`; batches of up to :data:`VISION_GRAPH_MAX` images replay
        a graph (the vision tower is launch-bound there), larger ones run eagerly."""
        n = pixels.shape[0]
        if not self.graphs_enabled or not 0 < n <= VISION_GRAPH_MAX:
            return self.model.encode_images(pixels)
        graph = self._vision_graphs.get(n)
        if graph is None:
            graph = self._vision_graphs[n] = self._capture_vision(n)
        graph.inputs["pixels"].copy_(pixels)
        return graph.replay().clone()  # [N, 256, C]: the graph's buffer is rewritten by the next call

    @torch.inference_mode()
    def prefill(self, input_ids: torch.Tensor, slot: int, image_features: torch.Tensor | None = None,
                image_slots: Sequence[int] = ()) -> torch.Tensor:
        """As :meth:`QwenVL.prefill`: ``input_ids [T]`` into cache row ``slot`` -> float32 logits
        ``[vocab]`` of the last position.

        With graphs, a prompt of up to :data:`PREFILL_GRAPH_MAX` tokens runs padded to a multiple
        of :data:`PREFILL_GRANULE` (one graph per padded length): causal attention keeps the
        padding out of the real tokens, and the cache positions it writes past ``T`` are
        rewritten by decode before anything reads them."""
        decoder = self.model.transformer
        args = self.args.llm
        length = input_ids.shape[0]
        if not 0 <= slot < decoder.max_batch_size:
            raise ValueError(f"slot {slot} outside the cache's {decoder.max_batch_size} rows (setup_cache first)")
        if length > decoder.max_seq_len:
            raise ValueError(f"{length} tokens do not fit the cache's {decoder.max_seq_len} positions")
        x = decoder.embed(input_ids[None], image_features, image_slots, self.image_tokens)[0]  # [T, C]
        alpha = ntk_alpha(length, args.seq_length) if args.use_dynamic_ntk else 1.0
        decoder.slot_inv_freq[slot] = rotary_inv_freq(args.rotary_dim, args.rotary_emb_base, alpha, x.device)
        bucket = -(-length // PREFILL_GRANULE) * PREFILL_GRANULE
        if self.graphs_enabled and bucket <= min(PREFILL_GRAPH_MAX, decoder.max_seq_len):
            graph = self._prefill_graphs.get(bucket)
            inputs = None if graph is None else graph.inputs
            if graph is None:
                inputs = _prefill_inputs(bucket, x.shape[1], x.dtype, x.device)
            inputs["x"][:length].copy_(x)
            inputs["x"][length:].zero_()
            inputs["slots"].fill_(slot)
            inputs["last"].fill_(length - 1)
            if graph is None:  # captured on this slot, which the prefill overwrites anyway
                graph = self._prefill_graphs[bucket] = _Graph(
                    lambda: self._prefill_step(**inputs), inputs, self._pools["prefill"], self.device)
            return graph.replay()
        positions = torch.arange(length, device=x.device)  # [T]
        slots = torch.full((length,), slot, dtype=torch.long, device=x.device)  # [T]
        last = torch.tensor([length - 1], device=x.device)
        return self._prefill_step(x, positions, slots, last)

    @torch.inference_mode()
    def decode(self, tokens: torch.Tensor, positions: torch.Tensor, slots: torch.Tensor,
               kv_len: int | None = None) -> torch.Tensor:
        """As :meth:`QwenVL.decode` -> float32 logits ``[B, vocab]``. With graphs the result is the
        graph's output buffer: read it before the next decode call."""
        graph = self._decode_graphs.get(tokens.shape[0])
        if graph is None:
            return self._decode_step(tokens, positions, slots, kv_len)
        graph.inputs["tokens"].copy_(tokens, non_blocking=True)
        graph.inputs["positions"].copy_(positions, non_blocking=True)
        graph.inputs["slots"].copy_(slots, non_blocking=True)
        return graph.replay()

    # -- the forward -----------------------------------------------------------------------------

    def _prefill_step(self, x: torch.Tensor, positions: torch.Tensor, slots: torch.Tensor,
                      last: torch.Tensor) -> torch.Tensor:
        """``x [T, C]`` at ``positions`` of row ``slots[0]`` (all equal) -> float32 logits ``[V]``
        of token ``last`` (``[1]``)."""
        decoder = self.model.transformer
        residual, pending = self._layers_forward(x, positions, slots, prefill=True)
        hidden, _ = kernels.rms_norm(residual.index_select(0, last), decoder.ln_f.weight,
                                     self.args.llm.layer_norm_eps, pending.index_select(0, last))  # [1, C]
        return linear(hidden, self.model.lm_head)[0].float()  # [V]

    def _decode_step(self, tokens: torch.Tensor, positions: torch.Tensor, slots: torch.Tensor,
                     kv_len: int | None = None) -> torch.Tensor:
        decoder = self.model.transformer
        eps = self.args.llm.layer_norm_eps
        x = decoder.wte(tokens)  # [B, C]
        if self._norms_in_gemvs(x):
            residual = self._decode_layers(x, positions, slots, kv_len)
            return linear(residual, self.model.lm_head, norm=(decoder.ln_f.weight, eps)).float()  # [B, V]
        residual, pending = self._layers_forward(x, positions, slots, kv_len=kv_len)
        hidden, _ = kernels.rms_norm(residual, decoder.ln_f.weight, eps, pending)
        return linear(hidden, self.model.lm_head).float()  # [B, V]

    def _norms_in_gemvs(self, x: torch.Tensor) -> bool:
        """Whether decoding ``x [B, C]`` takes :meth:`_decode_layers`: :data:`.kernels.NORM_IN_GEMV`,
        int8 weights and a batch size whose GEMVs run on the CUDA GEMV (on a CPU: the same
        arithmetic, unfused)."""
        if not (kernels.NORM_IN_GEMV and self._layers and isinstance(self._layers[0].c_attn, Int8Linear)):
            return False
        rows, k = self._layers[0].c_attn.qweight.shape
        return kernels.int8_gemv_variant(rows, k, x.shape[0]) == "cuda"

    def _decode_layers(self, x: torch.Tensor, positions: torch.Tensor, slots: torch.Tensor,
                       kv_len: int | None) -> torch.Tensor:
        """``x [B, C]`` -> the residual stream after the last layer, each RMSNorm inside the GEMV
        that reads its output and each residual add inside the GEMV that feeds it
        (:func:`.kernels.norm_linear`): five launches a layer."""
        eps = self.args.llm.layer_norm_eps
        lengths = None if kernels.fuses_rotary(x) else positions + 1  # [B]
        residual = x
        for layer in self._layers:
            qkv = linear(residual, layer.c_attn, norm=(layer.ln_1, eps))  # [B, 3C]
            attn = self._decode_attention(qkv, layer, positions, slots, kv_len, lengths)  # [B, C]
            residual = linear(attn, layer.c_proj, residual=residual)
            h = gated(residual, layer.gate_up, norm=(layer.ln_2, eps))  # [B, F]
            residual = linear(h, layer.down, residual=residual)
        return residual

    def _decode_attention(self, qkv: torch.Tensor, layer: _LayerRefs, positions: torch.Tensor, slots: torch.Tensor,
                          kv_len: int | None, lengths: torch.Tensor | None) -> torch.Tensor:
        """One layer's decode attention: rotary and logn on ``qkv [B, 3C]``, the new keys and
        values into the cache, each row's query over its cache row -> ``[B, C]``."""
        decoder = self.model.transformer
        args = self.args.llm
        logn = decoder.logn if args.use_logn_attn else None
        return kernels.rotary_attention(qkv, positions, slots, decoder.slot_inv_freq, logn, layer.k, layer.v,
                                        args.num_heads, kv_len, lengths)

    def _layers_forward(self, x: torch.Tensor, positions: torch.Tensor, slots: torch.Tensor, *,
                        prefill: bool = False, kv_len: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """``x [M, C]``: M tokens, token ``m`` at ``positions[m]`` of row ``slots[m]`` (a prefill:
        one row, positions ``0..M-1``) -> the residual stream and the last layer's MLP output,
        whose sum is the last block's output (left unsummed so ln_f can fuse the add)."""
        decoder = self.model.transformer
        args = self.args.llm
        eps = args.layer_norm_eps
        logn = decoder.logn if args.use_logn_attn else None
        m = x.shape[0]
        # each token sees its row up to itself; only the two-launch decode attention reads it
        lengths = None if prefill or kernels.fuses_rotary(x) else positions + 1  # [M]
        residual, pending = x, None
        for layer in self._layers:
            h, residual = kernels.rms_norm(residual, layer.ln_1, eps, pending)  # [M, C]
            qkv = linear(h, layer.c_attn)  # [M, 3C]
            if prefill:
                q, k, v = kernels.rotary_to_cache(qkv, positions, slots, decoder.slot_inv_freq, logn,
                                                  layer.k, layer.v, args.num_heads, return_kv=True)  # [T, H, D]
                out = F.scaled_dot_product_attention(q.transpose(0, 1)[None], k.transpose(0, 1)[None],
                                                     v.transpose(0, 1)[None], is_causal=True)  # [1, H, T, D]
                attn = out[0].transpose(0, 1).reshape(m, -1)  # [T, C]
            else:
                attn = self._decode_attention(qkv, layer, positions, slots, kv_len, lengths)  # [B, C]
            h, residual = kernels.rms_norm(residual, layer.ln_2, eps, linear(attn, layer.c_proj))
            pending = linear(gated(h, layer.gate_up), layer.down)  # [M, C]
        return residual, pending

    # -- graphs ----------------------------------------------------------------------------------

    def _capture_decode(self, batch: int) -> _Graph:
        # Warm-up and capture write k/v at position 0 of rows 0..batch-1: only while the cache is empty.
        device = self.device
        inputs = {"tokens": torch.zeros(batch, dtype=torch.long, device=device),
                  "positions": torch.zeros(batch, dtype=torch.long, device=device),
                  "slots": torch.arange(batch, dtype=torch.long, device=device)}
        return _Graph(lambda: self._decode_step(**inputs), inputs, self._pools["decode"], device)

    def _capture_vision(self, n: int) -> _Graph:
        vision = self.args.vision
        weight = self.model.transformer.visual.conv1.weight
        inputs = {"pixels": torch.zeros(n, 3, vision.image_size, vision.image_size, dtype=weight.dtype,
                                        device=weight.device)}
        return _Graph(lambda: self.model.encode_images(inputs["pixels"]), inputs, self._pools["vision"],
                      weight.device)


# Graph limits: prompts up to PREFILL_GRAPH_MAX tokens and vision batches up to VISION_GRAPH_MAX
# images replay graphs; past those sizes the launches are a small share of the work.
PREFILL_GRAPH_MAX = 2048
PREFILL_GRANULE = 32
VISION_GRAPH_MAX = 4


def _prefill_inputs(bucket: int, width: int, dtype: torch.dtype, device: torch.device) -> dict[str, torch.Tensor]:
    return {"x": torch.zeros(bucket, width, dtype=dtype, device=device),
            "positions": torch.arange(bucket, device=device),
            "slots": torch.zeros(bucket, dtype=torch.long, device=device),
            "last": torch.zeros(1, dtype=torch.long, device=device)}


class _Graph:
    """One captured CUDA graph with its input buffers (``inputs``) and output."""

    def __init__(self, step, inputs: dict[str, torch.Tensor], pool, device: torch.device) -> None:
        self.inputs = inputs
        # Warm up on a side stream (Triton compiles, cuBLAS picks its kernels), then capture.
        stream = torch.cuda.Stream(device)
        stream.wait_stream(torch.cuda.current_stream(device))
        with torch.cuda.stream(stream):
            for _ in range(2):
                step()
        torch.cuda.current_stream(device).wait_stream(stream)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph, pool=pool):
            self.output = step()

    def replay(self) -> torch.Tensor:
        self.graph.replay()
        return self.output
