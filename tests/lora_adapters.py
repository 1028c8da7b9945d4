"""PEFT adapters for the LoRA tests, on the tiny Qwen2.5-VL checkpoint, and HF + PEFT references.

PEFT starts lora_B at zero (an adapter that changes nothing); these re-randomise every LoRA
weight so that each adapter changes the model's answers.
"""

from __future__ import annotations

import json
import os

import torch
from safetensors.torch import load_file, save_file

from tests.hf_reference import HFReference

DECODER_MODULES = r".*language_model.*\.(q_proj|k_proj|v_proj|o_proj|gate_proj|up_proj|down_proj)"
TOWER_MODULES = r".*visual.*\.(qkv|proj|gate_proj|up_proj|down_proj|mlp\.0|mlp\.2)"


def make_adapter(
    base_path: str, out: str, target_modules, seed: int, r: int = 8, lora_alpha: float = 16, **kw
) -> str:
    """A PEFT LoRA adapter of `base_path` saved to `out`, its weights random."""
    from peft import LoraConfig, get_peft_model
    from transformers import Qwen2_5_VLForConditionalGeneration

    model = Qwen2_5_VLForConditionalGeneration.from_pretrained(base_path, dtype=torch.float32)
    config = LoraConfig(r=r, lora_alpha=lora_alpha, target_modules=target_modules, **kw)
    peft_model = get_peft_model(model, config)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in peft_model.named_parameters():
            if "lora_" in name:
                param.copy_(torch.randn(param.shape, generator=gen) * 0.3)
    peft_model.save_pretrained(out)
    return out


def fuse_qkv(split_path: str, out: str) -> str:
    """The adapter at `split_path` (q, k, v sharing one lora_A per layer, as `share_qkv_a`
    makes them) rewritten as Phi checkpoints name it: one `qkv_proj` module per layer, B's
    rows q | k | v."""
    tensors = load_file(os.path.join(split_path, "adapter_model.safetensors"))
    fused: dict[str, torch.Tensor] = {}
    for key in tensors:
        if key.endswith(".q_proj.lora_A.weight"):
            layer = key.removesuffix(".q_proj.lora_A.weight")
            fused[f"{layer}.qkv_proj.lora_A.weight"] = tensors[key]
            parts = [tensors[f"{layer}.{p}.lora_B.weight"] for p in ("q_proj", "k_proj", "v_proj")]
            fused[f"{layer}.qkv_proj.lora_B.weight"] = torch.cat(parts)
    os.makedirs(out, exist_ok=True)
    save_file(fused, os.path.join(out, "adapter_model.safetensors"))
    with open(os.path.join(split_path, "adapter_config.json")) as f:
        config = json.load(f)
    config["target_modules"] = ["qkv_proj"]
    with open(os.path.join(out, "adapter_config.json"), "w") as f:
        json.dump(config, f)
    return out


def share_qkv_a(path: str) -> None:
    """Give each layer's k_proj and v_proj the lora_A of its q_proj (in place)."""
    file = os.path.join(path, "adapter_model.safetensors")
    tensors = load_file(file)
    for key in list(tensors):
        if ".q_proj.lora_A." in key:
            for part in ("k_proj", "v_proj"):
                tensors[key.replace(".q_proj.", f".{part}.")] = tensors[key].clone()
    save_file(tensors, file)


def peft_reference(base_path: str, adapter_path: str | None) -> HFReference:
    """The HF reference of `base_path`, with the adapter applied by PEFT (None: without)."""
    ref = HFReference(base_path, "qwen2_5_vl")
    if adapter_path is not None:
        from peft import PeftModel

        ref.model = PeftModel.from_pretrained(ref.model, adapter_path).eval()
    return ref
