import pytest
import torch
from torch import nn

from common.augment import apply_mask
from common.config import ModelConfig
from common.features import FeatureSpec
from common.ragged import Ragged
from common.towers import Tower, build_towers

SPECS = [
    FeatureSpec("item_id", "item", "id", False, "item_index", 12),
    FeatureSpec("genre", "item", "categorical", False, "f_genre", 5),
    FeatureSpec("tags", "item", "multi", True, "f_tags", 7),
    FeatureSpec("user_id", "user", "id", False, "user_index", 9),
    FeatureSpec("age", "user", "bucketized", False, "f_age", 4),
    FeatureSpec("history", "user", "history", True, "history", 12, shares_embedding_with="item_id"),
]
ITEM_SPECS = [s for s in SPECS if s.side == "item"]
CFG = ModelConfig(embedding_dim=8, tower_layers=(16, 6))


def item_batch():
    return {
        "item_id": torch.tensor([2, 3, 4, 11]),
        "genre": torch.tensor([2, 2, 3, 1]),
        "tags": Ragged.from_lists([[2, 3], [4], [5, 6, 2], [1]]),
    }


def user_batch():
    return {
        "user_id": torch.tensor([2, 3, 8]),
        "age": torch.tensor([2, 3, 2]),
        "history": Ragged.from_lists([[2, 3, 4], [11], [5]]),
    }


def test_shapes_and_unit_norm():
    torch.manual_seed(0)
    item, user = build_towers(SPECS, CFG)
    zi, zu = item(item_batch()), user(user_batch())
    assert zi.shape == (4, 6) and zu.shape == (3, 6)
    torch.testing.assert_close(zi.norm(dim=-1), torch.ones(4))
    torch.testing.assert_close(zu.norm(dim=-1), torch.ones(3))
    assert item.out_dim == 6


def test_mlp_relu_between_layers_none_after_last():
    item, _ = build_towers(SPECS, ModelConfig(embedding_dim=8, tower_layers=(16, 12, 6)))
    kinds = [type(m) for m in item.mlp]
    assert kinds == [nn.Linear, nn.ReLU, nn.Linear, nn.ReLU, nn.Linear]
    assert item.mlp[0].in_features == 8 * 3


def test_history_uses_the_item_id_table():
    item, user = build_towers(SPECS, CFG)
    assert user.embeddings["history"].weight is item.embeddings["item_id"].weight
    task_params = list(item.parameters()) + [p for p in user.parameters()]
    assert len({id(p) for p in task_params}) == len(task_params) - 1  # the one shared table
    # history embedding = mean of item-id rows of the past items (empty-free rows here).
    emb = user.embed(user_batch())
    w = item.embeddings["item_id"].weight
    hist = emb[:, 16:24]  # user_id, age, history in spec order
    torch.testing.assert_close(hist[0], w[[2, 3, 4]].mean(0))
    torch.testing.assert_close(hist[1], w[11])


def test_multi_valued_mean_and_empty_rows():
    item, _ = build_towers(SPECS, CFG)
    feats = item_batch()
    feats["tags"] = Ragged.from_lists([[2, 3], [], [5, 6, 2], [1]])
    emb = item.embed(feats)
    w = item.embeddings["tags"].weight
    tags = emb[:, 16:24]
    torch.testing.assert_close(tags[0], w[[2, 3]].mean(0))
    torch.testing.assert_close(tags[1], torch.zeros(8))
    torch.testing.assert_close(tags[2], w[[5, 6, 2]].mean(0))


def test_masked_rows_share_the_default_embedding():
    item, _ = build_towers(SPECS, CFG)
    feats = item_batch()
    all_masked = apply_mask(feats, ITEM_SPECS, {"item_id", "genre", "tags"})
    emb = item.embed(all_masked)
    default = torch.cat([item.embeddings[n].weight[0] for n in ("item_id", "genre", "tags")])
    for row in emb:
        torch.testing.assert_close(row, default)
    out = item(all_masked)
    torch.testing.assert_close(out, out[:1].expand_as(out))
    # Rows that differ only in masked features embed identically.
    partly = apply_mask(
        {"item_id": torch.tensor([2, 9]), "genre": torch.tensor([3, 3]), "tags": Ragged.from_lists([[2], [5, 6]])},
        ITEM_SPECS,
        {"item_id", "tags"},
    )
    z = item(partly)
    torch.testing.assert_close(z[0], z[1])


def test_bad_inputs_are_reported():
    item, user = build_towers(SPECS, CFG)
    feats = item_batch()
    del feats["genre"]
    with pytest.raises(KeyError, match="genre"):
        item(feats)
    feats = item_batch()
    feats["tags"] = torch.tensor([1, 2, 3, 4])
    with pytest.raises(TypeError, match="Ragged"):
        item(feats)
    bad = [s if s.name != "history" else FeatureSpec("history", "user", "history", True, "history", 5, "item_id") for s in SPECS]
    with pytest.raises(ValueError, match="sizes must agree"):
        build_towers(bad, CFG)
    with pytest.raises(ValueError, match="no features"):
        Tower([], CFG, "item")
