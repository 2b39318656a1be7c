"""The PyTorch Qwen-VL-Chat model: one file per part, official Hugging Face tensor names.

- :mod:`.args`: hyper-parameters from config.json (:class:`QwenVLArgs`).
- :mod:`.preprocess`: PIL image -> CLIP-normalised ``[3, 448, 448]`` pixels.
- :mod:`.vision`: ViT + attention-pool resampler -> ``[N, 256, hidden]`` image features.
- :mod:`.decoder`: the QWen decoder with a static, slotted KV cache.
- :mod:`.qwen_vl`: :class:`QwenVL`, the wiring (``encode_images``, ``setup_cache``, ``prefill``,
  ``decode``, cache-free ``forward``).
- :mod:`.checkpoint`: :func:`load_model` for safetensors / .bin folders, single or sharded.
"""

from .args import LLMArgs, QwenVLArgs, VisionArgs
from .checkpoint import load_model
from .preprocess import preprocess_image, preprocess_images
from .qwen_vl import QwenVL

__all__ = ["LLMArgs", "QwenVL", "QwenVLArgs", "VisionArgs", "load_model", "preprocess_image", "preprocess_images"]
