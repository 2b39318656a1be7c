"""The TensorRT-LLM backend: a TensorRT vision engine + TensorRT-LLM executor behind the Engine protocol.

- :mod:`.requests`: request building as plain code (fake image ids, prompt tables, extra ids for
  KV-cache reuse, stop words, sampling), testable anywhere.
- :mod:`.vision`: the TensorRT vision engine and the per-worker feature cache.
- :mod:`.engine`: :class:`TrtllmEngine` and its executor adapter; ``from_settings`` refuses to
  start, saying what to install or build, where TensorRT-LLM or the engine files are missing.

Importing this package needs neither torch nor TensorRT; they load when an engine is built.
"""

from .engine import TrtllmEngine

__all__ = ["TrtllmEngine"]
