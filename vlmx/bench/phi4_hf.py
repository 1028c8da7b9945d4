"""Phi-4-multimodal in the bench: its prompt form, and transformers' model with the inputs its
image processor makes (the published processor's own code never runs).

transformers reads the published config.json only with the checkpoint's code, so the config
comes from vlmx's reader (`load_hf_config`) and the model is `Phi4MultimodalForCausalLM` built
from it (random weights for a preset, else `from_pretrained` of a transformers-layout folder).
"""

from __future__ import annotations

import torch

PHI4_ARCHITECTURES = ("Phi4MMForCausalLM", "Phi4MultimodalForCausalLM")


def load_phi4_hf(path: str, load_format: str, device: torch.device, dtype: torch.dtype):
    """(transformers model, make_inputs): `make_inputs(chunk)` turns (question, images) pairs
    into one left-padded batch on `device`, each image's tag expanded to its image tokens."""
    from transformers import (
        AutoTokenizer,
        Phi4MultimodalForCausalLM,
        Phi4MultimodalImageProcessor,
    )

    from vlmx.models.loader import load_hf_config

    config = load_hf_config(path)
    if load_format == "dummy":
        with torch.device(device):
            model = Phi4MultimodalForCausalLM._from_config(config, dtype=dtype)
    elif config.architectures[0] == "Phi4MMForCausalLM":
        raise ValueError(
            f"{path} is in the published Phi-4 layout, whose weights transformers loads only with "
            "the checkpoint's own code; bench the hf backend on a transformers-layout folder "
            "(Phi4MultimodalForCausalLM) or on the phi-4-multimodal preset"
        )
    else:
        model = Phi4MultimodalForCausalLM.from_pretrained(path, dtype=dtype).to(device)
    tokenizer = AutoTokenizer.from_pretrained(path, config=config)
    image_processor = Phi4MultimodalImageProcessor()
    image_token_id = config.vision_config.image_token_id
    pad_id = tokenizer.pad_token_id

    def make_inputs(chunk: list) -> dict:
        images = [im for _, ims in chunk for im in ims]
        out = image_processor(images, return_tensors="pt")
        counts = iter(out["num_img_tokens"])
        rows = []
        for question, ims in chunk:
            ids = tokenizer.encode("<|user|>")
            for _ in ims:
                ids += [image_token_id] * int(next(counts))
            ids += tokenizer.encode(f"{question}<|end|><|assistant|>", add_special_tokens=False)
            rows.append(ids)
        width = max(len(r) for r in rows)
        input_ids = torch.tensor([[pad_id] * (width - len(r)) + r for r in rows])
        mask = torch.tensor([[0] * (width - len(r)) + [1] * len(r) for r in rows])
        batch = {
            "input_ids": input_ids,
            "attention_mask": mask,
            "image_pixel_values": out["image_pixel_values"].to(dtype),
            "image_sizes": out["image_sizes"],
            "image_attention_mask": out["image_attention_mask"],
        }
        return {k: v.to(device) for k, v in batch.items()}

    return model.eval(), make_inputs
