"""The built-in demo: a tiny Qwen2.5-VL-shaped model with random weights and two images."""
