"""Find a checkpoint, read its config, stream its weights into a model."""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Iterator

import torch
from safetensors import safe_open
from transformers import AutoConfig, PretrainedConfig

from vlmx.models.registry import config_reader, get_model_class, resolve_architecture

logger = logging.getLogger(__name__)


def resolve_model_path(model: str, revision: str | None = None) -> str:
    """A local folder as is; anything else is a hub id, downloaded with huggingface_hub."""
    if os.path.isdir(model):
        return model
    if os.path.exists(model):
        raise ValueError(f"model {model!r} is a file; give the folder that holds config.json")
    from huggingface_hub import snapshot_download

    try:
        return snapshot_download(
            model,
            revision=revision,
            allow_patterns=["*.json", "*.safetensors", "*.jinja", "*.txt", "*.model", "*.tiktoken"],
            # Mistral repos also ship one consolidated file of every weight (tens of GB)
            ignore_patterns=["consolidated*.safetensors"],
        )
    except Exception as e:  # network, auth, unknown repo: one message a user can act on
        raise ValueError(
            f"model {model!r} is not a local folder and could not be downloaded from the hub "
            f"({type(e).__name__}: {e}); pass the path of a downloaded checkpoint instead"
        ) from e


def load_hf_config(
    model_path: str, hf_overrides: dict | None = None, trust_remote_code: bool = False
) -> PretrainedConfig:
    """The checkpoint's config, read by transformers' own classes for the architectures vlmx
    supports. Code shipped in a model folder is never run (whatever `trust_remote_code` says):
    an architecture vlmx has no reader for is refused before transformers looks at it."""
    path = os.path.join(model_path, "config.json")
    if not os.path.isfile(path):
        raise ValueError(f"{model_path!r} holds no config.json; is it a Hugging Face checkpoint?")
    with open(path) as f:
        raw = json.load(f)
    overrides = hf_overrides or {}
    resolve_architecture(overrides.get("architectures", raw.get("architectures")))
    reader = config_reader(raw.get("model_type"))
    if reader is not None:  # a published layout transformers reads only with remote code
        config = reader(raw)
    else:
        config = AutoConfig.from_pretrained(model_path, trust_remote_code=False)
    for key, value in overrides.items():
        setattr(config, key, value)
    return config


def text_config(hf_config: PretrainedConfig) -> PretrainedConfig:
    """The language model's config: `text_config` where the checkpoint nests one, else itself."""
    return getattr(hf_config, "text_config", None) or hf_config


def safetensors_files(model_path: str) -> list[str]:
    index = os.path.join(model_path, "model.safetensors.index.json")
    if os.path.isfile(index):
        with open(index) as f:
            names = sorted(set(json.load(f)["weight_map"].values()))
    else:
        names = sorted(n for n in os.listdir(model_path) if n.endswith(".safetensors"))
    if not names:
        raise ValueError(f"no .safetensors weights in {model_path!r}")
    return [os.path.join(model_path, n) for n in names]


def iterate_weights(model_path: str) -> Iterator[tuple[str, torch.Tensor]]:
    """(name, tensor) for every tensor of every shard, loaded one at a time on the CPU."""
    for path in safetensors_files(model_path):
        with safe_open(path, framework="pt", device="cpu") as f:
            for name in f.keys():  # noqa: SIM118 (safe_open is not a dict)
                yield name, f.get_tensor(name)


def build_model(
    architecture: str,
    hf_config: PretrainedConfig,
    model_path: str,
    device: torch.device,
    dtype: torch.dtype,
    load_format: str = "auto",
) -> torch.nn.Module:
    """Construct the family's model directly on `device` in `dtype`, then load its weights
    (`load_format="dummy"`: fill them with small random values instead, for benchmarks)."""
    model_cls = get_model_class(architecture)
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            model = model_cls(hf_config)
    finally:
        torch.set_default_dtype(previous)
    if load_format == "dummy":
        with torch.no_grad():
            for param in model.parameters():
                param.uniform_(-1e-3, 1e-3)
        for module in model.modules():  # padding stays zero, as after a real load
            if hasattr(module, "zero_padding"):
                module.zero_padding()
    else:
        model.load_weights(iterate_weights(model_path))
    return model.eval()
