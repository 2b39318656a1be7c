"""Small in-memory Qwen-VL models for the model tests (no files, no shared data)."""

from __future__ import annotations

import copy

import pytest
import torch

from engine_build.tiny_model import TINY_CONFIG, random_state_dict
from worker.engine.model.args import QwenVLArgs
from worker.engine.model.qwen_vl import QwenVL

SMALL_VOCAB = 640
SMALL_IMAGE_START = SMALL_VOCAB - 8  # <img>; </img> and <imgpad> follow


def small_config(**llm_overrides: object) -> dict:
    """The tiny checkpoint's config.json with a 640-token vocabulary (and any overrides)."""
    config = copy.deepcopy(TINY_CONFIG)
    config["vocab_size"] = SMALL_VOCAB
    config["visual"]["image_start_id"] = SMALL_IMAGE_START
    config.update(llm_overrides)
    return config


def build_model(seed: int = 0, **llm_overrides: object) -> QwenVL:
    """A float32 CPU model with the tiny checkpoint's random weights."""
    args = QwenVLArgs.from_hf_config(small_config(**llm_overrides))
    model = QwenVL(args)
    model.load_state_dict(random_state_dict(args, seed))
    return model.eval()


@pytest.fixture(scope="session")
def small_model() -> QwenVL:
    return build_model()


@pytest.fixture(scope="session")
def model_factory():
    """``build_model(seed=0, **config_overrides)``: a fresh small model."""
    return build_model


@pytest.fixture(scope="session")
def pixels() -> torch.Tensor:
    """Two random 'images' [2, 3, 448, 448] in CLIP-normalised range."""
    return torch.randn(2, 3, 448, 448, generator=torch.Generator().manual_seed(1))
