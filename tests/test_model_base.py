"""`vlmx.models.base.VLMBase`: the decoder side that every family's model inherits."""

from __future__ import annotations

from dataclasses import dataclass

import pytest
import torch
from torch import nn

from vlmx.models.base import VLMBase


@dataclass
class _Config:
    hidden_size: int = 4
    vocab_size: int = 6
    num_layers: int = 1
    num_kv_heads: int = 1
    head_dim: int = 4


class _Decoder(nn.Module):
    def __init__(self, cfg: _Config) -> None:
        super().__init__()
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.norm = nn.LayerNorm(cfg.hidden_size)


class _Model(VLMBase):
    decoder_name = "text"
    weight_prefixes = (("model.text.", "text."), ("lm_head.", "lm_head."))

    def __init__(self, tied: bool) -> None:
        super().__init__()
        self.config = _Config()
        self.text = _Decoder(self.config)
        self.lm_head = self.build_lm_head(tied)

    # a text-only stand-in: the vision half of the interface is no part of VLMBase
    def encode_images(self, features):
        raise NotImplementedError

    def profile_image_features(self, num_embeds):
        raise NotImplementedError


def _weights(model: _Model, **extra: torch.Tensor) -> list[tuple[str, torch.Tensor]]:
    body = [(f"model.text.{n}", torch.randn_like(p)) for n, p in model.text.named_parameters()]
    return body + list(extra.items()) + [("model.text.rotary.inv_freq", torch.ones(2))]


def test_logits_use_the_head_or_the_tied_embeddings():
    hidden = torch.randn(3, 4)
    for tied in (True, False):
        model = _Model(tied)
        assert (model.lm_head is None) == tied and model.num_layers == 1
        head = model.text.embed_tokens if tied else model.lm_head
        assert torch.equal(model.compute_logits(hidden), hidden @ head.weight.T)
        ids = torch.tensor([0, 5])
        assert torch.equal(model.embed_tokens(ids), model.text.embed_tokens(ids))


def test_weight_names_map_and_a_tied_head_is_skipped():
    tied, untied = _Model(True), _Model(False)
    assert untied.map_weight_name("model.text.norm.weight") == "text.norm.weight"
    assert untied.map_weight_name("x.inv_freq") is None
    assert untied.map_weight_name("other.weight") == "other.weight"  # reported as unexpected
    assert untied.map_weight_name("lm_head.weight") == "lm_head.weight"
    assert tied.map_weight_name("lm_head.weight") is None
    assert tied.rename_weight("lm_head.weight") == "lm_head.weight"
    head = torch.randn(6, 4)
    untied.load_weights(_weights(untied, **{"lm_head.weight": head}))
    assert torch.equal(untied.lm_head.weight, head)
    tied.load_weights(_weights(tied, **{"lm_head.weight": head}))  # skipped
    with pytest.raises(ValueError, match="missing 1 weight"):
        untied.load_weights(_weights(untied))


def test_load_weights_but_head_returns_the_head_checked():
    model = _Model(True)
    weights = _weights(model)
    assert model.load_weights_but_head(weights, model) is None
    assert torch.equal(model.text.norm.weight, dict(weights)["model.text.norm.weight"])
    head = torch.randn(6, 4)
    assert model.load_weights_but_head(_weights(model, **{"lm_head.weight": head}), model) is head
    with pytest.raises(ValueError, match=r"has shape \(5, 4\), expected \(6, 4\)"):
        model.load_weights_but_head(_weights(model, **{"lm_head.weight": torch.ones(5, 4)}), model)
    twice = _weights(model, **{"lm_head.weight": head}) + [("lm_head.weight", head)]
    with pytest.raises(ValueError, match="appears twice"):
        model.load_weights_but_head(twice, model)
