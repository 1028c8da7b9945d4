"""Tensor parallelism: the process's rank and group (`state`) and the collectives layers call."""
