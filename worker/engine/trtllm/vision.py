"""Image features for the TensorRT-LLM engine: the TensorRT vision engine and a feature cache.

:class:`TrtVisionEngine` runs ``vision.plan`` (built by ``engine_build.build_vit``) with the
TensorRT 10 Python API on torch CUDA buffers: float32 pixels ``[n, 3, 448, 448]`` in, features
``[n, 256, hidden]`` out, ``n`` within the engine's batch profile.

:class:`VisionFeatures` is what the engine calls per request: it looks each image up in an LRU
keyed by image content (the same :class:`worker.engine.runner.FeatureCache` the torch engine
uses), encodes the others in chunks of at most the profile's maximum, and returns the request's
features in image order, in the LLM's dtype and device, ready to become its prompt table.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path

import torch

from producer.errors import EngineUnavailable
from worker.engine.runner import FeatureCache
from worker.engine.types import IMAGE_TOKENS, ImageInput

INPUT_NAME = "input"
OUTPUT_NAME = "output"

Encoder = Callable[[torch.Tensor], torch.Tensor]  # pixels [n, 3, S, S] -> features [n, 256, hidden]


class VisionFeatures:
    """Features of a request's images, from a cache or ``encoder`` in chunks of ``max_batch``."""

    def __init__(self, encoder: Encoder, *, max_batch: int, device: torch.device | str,
                 dtype: torch.dtype, cache_images: int = 64) -> None:
        self.encoder = encoder
        self.max_batch = max_batch
        self.device = torch.device(device)
        self.dtype = dtype
        self.cache = FeatureCache(cache_images)

    @torch.inference_mode()
    def encode(self, images: Sequence[ImageInput]) -> torch.Tensor:
        """``[N, 256, hidden]`` features of ``images`` in order (``dtype`` on ``device``)."""
        found = [self.cache.get(image.key) for image in images]
        missing = [i for i, f in enumerate(found) if f is None]
        for chunk_start in range(0, len(missing), self.max_batch):
            chunk = missing[chunk_start:chunk_start + self.max_batch]
            pixels = torch.stack([torch.as_tensor(images[i].pixels) for i in chunk])  # [n, 3, S, S]
            features = self.encoder(pixels.to(self.device, torch.float32))  # [n, 256, hidden]
            if features.shape[:2] != (len(chunk), IMAGE_TOKENS):
                raise RuntimeError(f"the vision encoder returned {tuple(features.shape)} for {len(chunk)} images")
            features = features.to(self.device, self.dtype)
            for j, i in enumerate(chunk):
                found[i] = features[j]
                self.cache.put(images[i].key, features[j])
        return torch.stack(found)  # [N, 256, hidden]


class TrtVisionEngine:
    """A serialized TensorRT engine with input ``input`` and output ``output`` (one profile)."""

    def __init__(self, plan_path: str | Path, device: torch.device | str = "cuda") -> None:
        try:
            import tensorrt as trt
        except ImportError as e:
            raise EngineUnavailable(f"the tensorrt package is not importable ({e})") from None
        self._trt = trt
        self.device = torch.device(device)
        if self.device.type != "cuda":
            raise EngineUnavailable(f"a TensorRT vision engine needs a CUDA device, not {self.device}")
        plan_path = Path(plan_path)
        self._logger = trt.Logger(trt.Logger.WARNING)
        self._runtime = trt.Runtime(self._logger)
        with torch.cuda.device(self.device):
            self.engine = self._runtime.deserialize_cuda_engine(plan_path.read_bytes())
            if self.engine is None:
                raise EngineUnavailable(
                    f"TensorRT could not load {plan_path} (built with another TensorRT version or GPU?); "
                    "rebuild it with python -m engine_build.build_vit")
            self.context = self.engine.create_execution_context()
        min_shape, _, max_shape = self.engine.get_tensor_profile_shape(INPUT_NAME, 0)
        self.min_batch, self.max_batch = int(min_shape[0]), int(max_shape[0])
        self.image_size = int(max_shape[-1])
        self.output_dtype = _torch_dtype(trt, self.engine.get_tensor_dtype(OUTPUT_NAME))

    def __call__(self, pixels: torch.Tensor) -> torch.Tensor:
        """``pixels [n, 3, S, S]`` (``min_batch <= n <= max_batch``) -> ``[n, 256, hidden]``."""
        n = pixels.shape[0]
        if not self.min_batch <= n <= self.max_batch:
            raise ValueError(f"{n} images outside the engine's batch profile {self.min_batch}..{self.max_batch}")
        pixels = pixels.to(self.device, torch.float32).contiguous()
        with torch.cuda.device(self.device):
            self.context.set_input_shape(INPUT_NAME, tuple(pixels.shape))
            out_shape = tuple(self.context.get_tensor_shape(OUTPUT_NAME))  # (n, 256, hidden)
            output = torch.empty(out_shape, dtype=self.output_dtype, device=self.device)
            self.context.set_tensor_address(INPUT_NAME, pixels.data_ptr())
            self.context.set_tensor_address(OUTPUT_NAME, output.data_ptr())
            # On torch's current stream: ordered after the pixel copy, before any use of output.
            stream = torch.cuda.current_stream(self.device)
            if not self.context.execute_async_v3(stream.cuda_stream):
                raise RuntimeError("TensorRT vision engine execution failed")
        return output


def _torch_dtype(trt, dtype) -> torch.dtype:
    table = {trt.DataType.FLOAT: torch.float32, trt.DataType.HALF: torch.float16}
    if hasattr(trt.DataType, "BF16"):
        table[trt.DataType.BF16] = torch.bfloat16
    if dtype not in table:
        raise EngineUnavailable(f"unsupported vision engine output dtype {dtype}")
    return table[dtype]
