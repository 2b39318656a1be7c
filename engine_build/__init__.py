"""Offline tools: tokenizer and checkpoint conversion, TensorRT(-LLM) engine builds, the tiny checkpoint."""
