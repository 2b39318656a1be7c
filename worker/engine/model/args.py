"""Hyper-parameters of Qwen-VL-Chat, read from a Hugging Face ``config.json``.

:class:`QwenVLArgs.from_hf_config` is the only place that knows the config's key names; the model
code reads the dataclasses below, whose derived values are filled in ``__post_init__``.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from producer.errors import ConfigError

# The official vision tower hard-codes these; config.json does not carry them.
VISION_LAYER_NORM_EPS = 1e-6
RESAMPLER_HEAD_DIM = 128  # the resampler has output_dim // 128 heads
IMAGE_QUERIES = 256  # learned resampler queries: the image's 16x16 feature grid


@dataclass
class VisionArgs:
    """The ViT and its attention-pool resampler (config.json's ``visual`` block)."""

    image_size: int = 448
    patch_size: int = 14
    width: int = 1664
    layers: int = 48
    heads: int = 16
    mlp_ratio: float = 4.9231
    output_dim: int = 4096
    image_start_id: int = 151857
    n_queries: int = IMAGE_QUERIES
    layer_norm_eps: float = VISION_LAYER_NORM_EPS

    # derived
    grid_size: int = field(init=False)  # patches per side: 448 / 14 = 32
    num_patches: int = field(init=False)  # 1024
    head_dim: int = field(init=False)
    mlp_width: int = field(init=False)  # int(width * mlp_ratio), as the official code rounds
    query_grid: int = field(init=False)  # 16: the queries form a 16x16 grid
    pool_heads: int = field(init=False)
    image_end_id: int = field(init=False)  # </img>
    image_pad_id: int = field(init=False)  # <imgpad>

    def __post_init__(self) -> None:
        _require(self.image_size % self.patch_size == 0,
                 f"visual.image_size {self.image_size} is not a multiple of patch_size {self.patch_size}")
        _require(self.width % self.heads == 0, f"visual.width {self.width} is not divisible by heads {self.heads}")
        _require(self.output_dim % RESAMPLER_HEAD_DIM == 0,
                 f"visual.output_dim {self.output_dim} must be a multiple of {RESAMPLER_HEAD_DIM} "
                 "(the resampler has output_dim // 128 heads)")
        self.grid_size = self.image_size // self.patch_size
        self.num_patches = self.grid_size**2
        self.head_dim = self.width // self.heads
        self.mlp_width = int(self.width * self.mlp_ratio)
        self.query_grid = math.isqrt(self.n_queries)
        _require(self.query_grid**2 == self.n_queries, f"{self.n_queries} resampler queries are not a square grid")
        self.pool_heads = self.output_dim // RESAMPLER_HEAD_DIM
        self.image_end_id = self.image_start_id + 1
        self.image_pad_id = self.image_start_id + 2


@dataclass
class LLMArgs:
    """The QWen decoder."""

    vocab_size: int = 151936
    hidden_size: int = 4096
    num_layers: int = 32
    num_heads: int = 32
    kv_channels: int = 128
    intermediate_size: int = 22016  # config value; each of w1, w2 is half of it
    layer_norm_eps: float = 1e-6
    rotary_emb_base: float = 10000.0
    rotary_pct: float = 1.0
    seq_length: int = 2048  # dynamic NTK and logn attention start past this length
    max_position_embeddings: int = 8192
    use_dynamic_ntk: bool = True
    use_logn_attn: bool = True
    no_bias: bool = True  # c_proj and the MLP have no bias; c_attn always has one
    tie_word_embeddings: bool = False

    # derived
    head_dim: int = field(init=False)
    mlp_dim: int = field(init=False)  # 11008
    rotary_dim: int = field(init=False)

    def __post_init__(self) -> None:
        _require(self.hidden_size % self.num_heads == 0,
                 f"hidden_size {self.hidden_size} is not divisible by num_attention_heads {self.num_heads}")
        self.head_dim = self.hidden_size // self.num_heads
        # The official attention splits c_attn's output by hidden_size and heads by head_dim, so it
        # only works when kv_channels * heads == hidden_size; say so rather than compute garbage.
        _require(self.kv_channels * self.num_heads == self.hidden_size,
                 f"kv_channels {self.kv_channels} x heads {self.num_heads} != hidden_size {self.hidden_size}")
        _require(self.intermediate_size % 2 == 0, f"intermediate_size {self.intermediate_size} is odd")
        self.mlp_dim = self.intermediate_size // 2
        _require(0 < self.rotary_pct <= 1, f"rotary_pct {self.rotary_pct} is not in (0, 1]")
        self.rotary_dim = self.kv_channels if self.rotary_pct == 1.0 else int(self.kv_channels * self.rotary_pct)
        _require(self.rotary_dim % 2 == 0 and self.rotary_dim > 2, f"rotary dimension {self.rotary_dim} is unusable")
        _require(not self.tie_word_embeddings,
                 "tie_word_embeddings is true; Qwen-VL-Chat checkpoints have an untied lm_head")


@dataclass
class QwenVLArgs:
    """The whole model: vision tower + decoder, plus the dtype its weights were saved in."""

    vision: VisionArgs = field(default_factory=VisionArgs)
    llm: LLMArgs = field(default_factory=LLMArgs)
    torch_dtype: str = "bfloat16"

    def __post_init__(self) -> None:
        _require(self.vision.output_dim == self.llm.hidden_size,
                 f"visual.output_dim {self.vision.output_dim} != hidden_size {self.llm.hidden_size}: "
                 "image features must be the decoder's embeddings")
        _require(self.vision.image_pad_id < self.llm.vocab_size,
                 f"visual.image_start_id {self.vision.image_start_id} leaves <imgpad> outside vocab_size "
                 f"{self.llm.vocab_size}")

    @classmethod
    def from_hf_config(cls, config: dict[str, Any] | str | Path) -> QwenVLArgs:
        """Build from a ``config.json`` (its path, the folder holding it, or the parsed dict)."""
        if not isinstance(config, dict):
            path = Path(config)
            if path.is_dir():
                path = path / "config.json"
            try:
                config = json.loads(path.read_text(encoding="utf-8"))
            except FileNotFoundError as e:
                raise ConfigError(f"no model config at {path}: point the model path at a Qwen-VL-Chat "
                                  "folder holding config.json", path=str(path)) from e
            except (OSError, ValueError) as e:
                raise ConfigError(f"cannot read model config {path}: {e}", path=str(path)) from e
        try:
            visual = config["visual"]
            vision = VisionArgs(
                image_size=int(visual["image_size"]),
                patch_size=int(visual["patch_size"]),
                width=int(visual["width"]),
                layers=int(visual["layers"]),
                heads=int(visual["heads"]),
                mlp_ratio=float(visual["mlp_ratio"]),
                output_dim=int(visual["output_dim"]),
                image_start_id=int(visual["image_start_id"]),
            )
            llm = LLMArgs(
                vocab_size=int(config["vocab_size"]),
                hidden_size=int(config["hidden_size"]),
                num_layers=int(config["num_hidden_layers"]),
                num_heads=int(config["num_attention_heads"]),
                kv_channels=int(config["kv_channels"]),
                intermediate_size=int(config["intermediate_size"]),
                layer_norm_eps=float(config["layer_norm_epsilon"]),
                rotary_emb_base=float(config["rotary_emb_base"]),
                rotary_pct=float(config.get("rotary_pct", 1.0)),
                seq_length=int(config["seq_length"]),
                max_position_embeddings=int(config.get("max_position_embeddings", 8192)),
                use_dynamic_ntk=bool(config.get("use_dynamic_ntk", True)),
                use_logn_attn=bool(config.get("use_logn_attn", True)),
                no_bias=bool(config.get("no_bias", True)),
                tie_word_embeddings=bool(config.get("tie_word_embeddings", False)),
            )
        except KeyError as e:
            raise ConfigError(f"model config lacks the key {e.args[0]!r}; is this a Qwen-VL-Chat config.json?",
                              key=str(e.args[0])) from e
        except (TypeError, ValueError) as e:
            raise ConfigError(f"model config has a bad value: {e}") from e
        return cls(vision=vision, llm=llm, torch_dtype=str(config.get("torch_dtype", "bfloat16")))


def _require(condition: bool, message: str) -> None:
    if not condition:
        raise ConfigError(f"unsupported model config: {message}")
