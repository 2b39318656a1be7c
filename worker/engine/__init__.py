"""Engines: the Qwen-VL-Chat engine pair in PyTorch (default) and TensorRT-LLM."""
