"""The query (user) and item towers of the two-tower model.

Each tower embeds every feature with its own table (row 0 is the learned default embedding that
masked features fall back to, row 1 the OOV embedding), averages the values of multi-valued
features, concatenates the per-feature embeddings in spec order, runs an MLP (``model.tower_layers``,
ReLU between layers, none after the last) and L2-normalises, so the dot product of a user and an
item embedding is their cosine similarity.

The user tower's ``history`` feature is the mean of the item-id embeddings of the user's past items:
it uses the item tower's ``item_id`` table itself (the same ``Parameter``), so clicks in the history
and items as candidates live in one space, and the SSL task that trains the item tower also
improves history lookups.

Empty multi-valued rows embed to the zero vector (``embedding_bag`` mean of an empty bag); masking
and dropout never produce empty rows, they write the default value 0 instead.
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from common.config import ModelConfig
from common.features import ITEM_ID, FeatureSpec, side
from common.ragged import FeatureBatch, Ragged


class Tower(nn.Module):
    """``forward(feats) -> [batch, model.tower_layers[-1]]``, unit-norm rows.

    ``shared`` maps a feature name to a table owned by another tower (for specs with
    ``shares_embedding_with``); that module is registered here too (weight tying), so
    ``state_dict`` lists it under both towers while ``parameters()`` yields it once."""

    def __init__(
        self,
        specs: list[FeatureSpec],
        model_cfg: ModelConfig,
        which: Literal["item", "user"],
        shared: dict[str, nn.Module] | None = None,
    ) -> None:
        super().__init__()
        if not specs:
            raise ValueError(f"Tower({which!r}): no features; the manifest lists no {which}-side specs")
        self.which = which
        self.specs = list(specs)
        shared = shared or {}
        dim = model_cfg.embedding_dim
        tables: dict[str, nn.Module] = {}
        for spec in self.specs:
            if spec.shares_embedding_with is not None:
                if spec.name not in shared:
                    raise ValueError(
                        f"Tower({which!r}): feature {spec.name!r} shares the embedding of "
                        f"{spec.shares_embedding_with!r}, which no other tower provides"
                    )
                tables[spec.name] = shared[spec.name]
            elif spec.multi:
                tables[spec.name] = nn.EmbeddingBag(spec.vocab_size, dim, mode="mean")
            else:
                tables[spec.name] = nn.Embedding(spec.vocab_size, dim)
        self.embeddings = nn.ModuleDict(tables)
        widths = [dim * len(self.specs), *model_cfg.tower_layers]
        layers: list[nn.Module] = []
        for i, (a, b) in enumerate(zip(widths[:-1], widths[1:])):
            if i:
                layers.append(nn.ReLU())
            layers.append(nn.Linear(a, b))
        self.mlp = nn.Sequential(*layers)
        self.out_dim = model_cfg.tower_layers[-1]

    def embed(self, feats: FeatureBatch) -> Tensor:
        """Concatenated per-feature embeddings before the MLP, ``[batch, embedding_dim * n_features]``."""
        parts = []
        for spec in self.specs:
            if spec.name not in feats:
                raise KeyError(
                    f"{self.which} tower: the batch lacks feature {spec.name!r}; it holds "
                    f"{sorted(feats)} but the tower needs {[s.name for s in self.specs]}"
                )
            x = feats[spec.name]
            weight = self.embeddings[spec.name].weight
            if spec.multi:
                if not isinstance(x, Ragged):
                    raise TypeError(
                        f"{self.which} tower: feature {spec.name!r} is multi-valued and must be a "
                        f"Ragged, got {type(x).__name__}"
                    )
                parts.append(F.embedding_bag(x.values, weight, x.offsets, mode="mean"))
            else:
                if isinstance(x, Ragged) or x.dim() != 1:
                    raise TypeError(
                        f"{self.which} tower: feature {spec.name!r} is single-valued and must be an "
                        f"int64 [batch] tensor, got {type(x).__name__} "
                        f"{tuple(getattr(x, 'shape', ()))}"
                    )
                parts.append(F.embedding(x, weight))
        return torch.cat(parts, dim=-1)

    def forward(self, feats: FeatureBatch) -> Tensor:
        return F.normalize(self.mlp(self.embed(feats)), dim=-1)


def build_towers(specs: list[FeatureSpec], model_cfg: ModelConfig) -> tuple[Tower, Tower]:
    """``(item_tower, user_tower)``; the user tower's ``history`` uses the item tower's ``item_id`` table."""
    item_specs = side(specs, "item")
    user_specs = side(specs, "user")
    if not any(s.name == ITEM_ID for s in item_specs):
        raise ValueError(f"build_towers: no '{ITEM_ID}' among the item specs {[s.name for s in item_specs]}")
    item_tower = Tower(item_specs, model_cfg, "item")
    shared: dict[str, nn.Module] = {}
    for spec in user_specs:
        if spec.shares_embedding_with is None:
            continue
        owner = next((s for s in item_specs if s.name == spec.shares_embedding_with), None)
        if owner is None:
            raise ValueError(
                f"build_towers: user feature {spec.name!r} shares {spec.shares_embedding_with!r}, "
                f"which is not an item feature ({[s.name for s in item_specs]})"
            )
        if owner.vocab_size != spec.vocab_size:
            raise ValueError(
                f"build_towers: {spec.name!r} (vocab {spec.vocab_size}) shares the table of "
                f"{owner.name!r} (vocab {owner.vocab_size}); the sizes must agree, check manifest.json"
            )
        shared[spec.name] = item_tower.embeddings[owner.name]
    user_tower = Tower(user_specs, model_cfg, "user", shared)
    return item_tower, user_tower
