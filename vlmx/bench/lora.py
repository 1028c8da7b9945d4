"""Random LoRA adapters for `vlmx bench --lora-rank R --num-loras K`: rank R on every linear
layer of the decoder, written in PEFT's format into a temp folder, so anyone can rerun it."""

from __future__ import annotations

import json
import os

import torch
from safetensors.torch import save_file

from vlmx.lora.request import LoRARequest
from vlmx.lora.targets import find_targets
from vlmx.models.loader import load_hf_config
from vlmx.models.registry import get_model_class, resolve_architecture


def write_random_adapters(
    model_path: str, rank: int, num: int, folder: str, std: float = 0.01
) -> list[LoRARequest]:
    """`num` adapters of `rank` on all decoder linear layers (named as vlmx's fused layers,
    which map onto themselves whole), values ~ N(0, std^2) with scale alpha / r = 1."""
    hf_config = load_hf_config(model_path)
    architecture = resolve_architecture(getattr(hf_config, "architectures", None))
    with torch.device("meta"):
        model = get_model_class(architecture)(hf_config)
    targets = [t for t in find_targets(model).values() if not t.tower]
    requests = []
    for i in range(num):
        gen = torch.Generator().manual_seed(1000 + i)
        tensors = {}
        for t in targets:
            rows = sum(size for _, size in t.slices)
            key = f"base_model.model.{t.name}"
            tensors[f"{key}.lora_A.weight"] = torch.randn(rank, t.in_features, generator=gen) * std
            tensors[f"{key}.lora_B.weight"] = torch.randn(rows, rank, generator=gen) * std
        path = os.path.join(folder, f"adapter-{i}")
        os.makedirs(path, exist_ok=True)
        save_file({k: v.to(torch.bfloat16) for k, v in tensors.items()},
                  os.path.join(path, "adapter_model.safetensors"))  # fmt: skip
        config = {"peft_type": "LORA", "r": rank, "lora_alpha": rank, "target_modules": []}
        with open(os.path.join(path, "adapter_config.json"), "w") as f:
            json.dump(config, f)
        requests.append(LoRARequest(f"bench-{i}", i + 1, path))
    return requests
