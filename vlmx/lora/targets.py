"""Which of a model's linear layers LoRA may adapt, and how an adapter's modules map onto them.

vlmx fuses projections that read one input (`MergedLinear`: q | k | v, gate | up, with zero
padding rows where `padded_sizes` asks). A PEFT adapter names the checkpoint's modules; each maps
onto a vlmx module (through the family's `rename_weight`) whole, or onto one part of a fused one
(through its `packed_modules_mapping`):

```
adapter module                                   vlmx module (part)
model.language_model.layers.0.self_attn.q_proj   language_model.layers.0.self_attn.qkv_proj (0)
model.language_model.layers.0.mlp.up_proj        language_model.layers.0.mlp.gate_up_proj (1)
model.layers.0.self_attn.qkv_proj (Phi)          ...qkv_proj (whole: B's rows split by part)
```
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from vlmx.config import LoRAConfig
from vlmx.layers.mlp import MergedLinear, PaddedInputLinear
from vlmx.lora.adapter import adapter_shapes, read_adapter_config, split_key

# fused module -> its parts, in row order (vLLM's `packed_modules_mapping`)
DEFAULT_PACKED_MODULES: dict[str, tuple[str, ...]] = {
    "qkv_proj": ("q_proj", "k_proj", "v_proj"),
    "gate_up_proj": ("gate_proj", "up_proj"),
}


@dataclass(frozen=True, slots=True)
class LoRATarget:
    """A linear layer LoRA may adapt: input width (loaded, and with zero padding), the rows of
    each part in its output, and whether it is in the tower / projector (not the decoder)."""

    name: str
    in_features: int
    padded_in: int
    slices: tuple[tuple[int, int], ...]  # (row offset, rows) of each part
    out_features: int
    tower: bool


@dataclass(frozen=True, slots=True)
class LoRAPart:
    """One adapted module of an adapter: its A and B tensors' names, the vlmx target, which part
    of it (None: every part, B's rows split across them), rank and scale."""

    target: str
    part: int | None
    a_key: str
    b_key: str
    rank: int
    scale: float


@dataclass(frozen=True, slots=True)
class AdapterPlan:
    lora_int_id: int
    path: str
    parts: tuple[LoRAPart, ...]
    uses_tower: bool  # some part adapts the tower or projector (their outputs depend on it)


def find_targets(model: nn.Module) -> dict[str, LoRATarget]:
    """Every linear layer of `model` but the LM head: the decoder's, and (`tower=True`) those
    of the vision tower and projector."""
    decoder_prefix = f"{getattr(model, 'decoder_name', 'language_model')}."
    targets = {}
    for name, module in model.named_modules():
        if not isinstance(module, nn.Linear) or name == "lm_head":
            continue
        if isinstance(module, MergedLinear):
            offsets = [sum(module.padded_sizes[:i]) for i in range(len(module.output_sizes))]
            slices = tuple(zip(offsets, module.output_sizes))
        else:
            slices = ((0, module.out_features),)
        loaded_in = module.loaded_in if isinstance(module, PaddedInputLinear) else None
        targets[name] = LoRATarget(
            name=name,
            in_features=loaded_in or module.in_features,
            padded_in=module.in_features,
            slices=slices,
            out_features=module.out_features,
            tower=not name.startswith(decoder_prefix),
        )
    return targets


def _resolve(model: nn.Module, targets: dict[str, LoRATarget], module: str, path: str):
    """(target, part) of an adapter's module name; ValueError naming it if none matches."""
    rename = getattr(model, "rename_weight", lambda n: n)
    mapped = rename(f"{module}.weight")
    name = mapped.removesuffix(".weight") if mapped else None
    if name in targets:
        return targets[name], None
    if name is not None:
        parent, _, leaf = name.rpartition(".")
        packed = getattr(model, "packed_modules_mapping", DEFAULT_PACKED_MODULES)
        for fused, parts in packed.items():
            if leaf in parts and f"{parent}.{fused}" in targets:
                return targets[f"{parent}.{fused}"], list(parts).index(leaf)
    raise ValueError(
        f"adapter {path!r} targets module {module!r}, which vlmx cannot map onto a linear "
        f"layer of {type(model).__name__} (the LM head and embeddings are not adaptable)"
    )


def plan_adapter(
    model: nn.Module,
    targets: dict[str, LoRATarget],
    lora_int_id: int,
    path: str,
    config: LoRAConfig,
) -> AdapterPlan:
    """Check an adapter folder against the model (`targets`: `find_targets(model)`) and the
    LoRA limits, reading only its config and tensor shapes. Raises ValueError naming the
    problem: not an adapter, a module vlmx cannot map, a rank above `max_lora_rank`, a tower
    module while `enable_tower_connector_lora` is off, shapes that do not match."""
    adapter = read_adapter_config(path)
    shapes = adapter_shapes(path)
    pairs: dict[str, dict[str, str]] = {}
    for key in shapes:
        module, which = split_key(key)
        pairs.setdefault(module, {})[which] = key
    if not pairs:
        raise ValueError(f"adapter {path!r} holds no LoRA weights")
    parts = []
    for module, keys in sorted(pairs.items()):
        if set(keys) != {"A", "B"}:
            raise ValueError(f"adapter {path!r} has lora_A or lora_B of {module!r} alone")
        target, part = _resolve(model, targets, module, path)
        if target.tower and not config.enable_tower_connector_lora:
            raise ValueError(
                f"adapter {path!r} targets {module!r} of the vision tower / projector; build the "
                "engine with enable_tower_connector_lora=True to apply it"
            )
        rank, scale = adapter.rank_and_scale(module)
        a_shape, b_shape = shapes[keys["A"]], shapes[keys["B"]]
        if rank > config.max_lora_rank:
            raise ValueError(
                f"adapter {path!r} has rank {rank} (module {module!r}), above "
                f"max_lora_rank={config.max_lora_rank}; raise max_lora_rank"
            )
        rows = target.slices[part][1] if part is not None else sum(s for _, s in target.slices)
        if a_shape != (rank, target.in_features) or b_shape != (rows, rank):
            raise ValueError(
                f"adapter {path!r}: module {module!r} has lora_A {a_shape} and lora_B {b_shape}, "
                f"but vlmx's {target.name!r} needs ({rank}, {target.in_features}) and "
                f"({rows}, {rank}); is the adapter for another model?"
            )
        parts.append(LoRAPart(target.name, part, keys["A"], keys["B"], rank, scale))
    uses_tower = any(targets[p.target].tower for p in parts)
    return AdapterPlan(lora_int_id, path, tuple(parts), uses_tower)
