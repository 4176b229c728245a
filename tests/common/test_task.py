import copy
import random

import pytest
import torch

from common.config import Config, FeatureDecl, FeaturesConfig, ModelConfig, SSLConfig, TrainConfig
from common.features import FeatureSpec
from common.losses import batch_softmax_loss
from common.ragged import Ragged
from common.task import TwoTowerTask

SPECS = [
    FeatureSpec("item_id", "item", "id", False, "item_index", 20),
    FeatureSpec("genre", "item", "categorical", False, "f_genre", 6),
    FeatureSpec("tags", "item", "multi", True, "f_tags", 9),
    FeatureSpec("user_id", "user", "id", False, "user_index", 15),
    FeatureSpec("history", "user", "history", True, "history", 20, shares_embedding_with="item_id"),
]
MI = {
    frozenset({"genre", "tags"}): 0.6,
    frozenset({"item_id", "genre"}): 0.4,
    frozenset({"item_id", "tags"}): 0.5,
}


def make_cfg(method="none", alpha=0.3, logq=True, hits=True) -> Config:
    return Config(
        features=FeaturesConfig(item={"genre": FeatureDecl(), "tags": FeatureDecl(type="multi")}),
        model=ModelConfig(embedding_dim=8, tower_layers=(16, 8)),
        ssl=SSLConfig(method=method, alpha=alpha, tau=0.2, batch_size=4, fd_rate=0.5),
        train=TrainConfig(tau=0.1, logq_correction=logq, remove_accidental_hits=hits),
    )


def items(ids: list[int], seed: int) -> dict:
    rng = random.Random(seed)
    return {
        "item_id": torch.tensor(ids),
        "genre": torch.tensor([2 + i % 4 for i in ids]),
        "tags": Ragged.from_lists([[rng.randrange(2, 9) for _ in range(rng.choice([1, 2, 3]))] for _ in ids]),
    }


def users(n: int, seed: int) -> dict:
    rng = random.Random(seed)
    return {
        "user_id": torch.tensor([rng.randrange(2, 15) for _ in range(n)]),
        "history": Ragged.from_lists([[rng.randrange(2, 20) for _ in range(rng.choice([0, 1, 4]))] for _ in range(n)]),
    }


def batch(seed: int, ids=(2, 3, 4, 3, 7, 9)):
    ids = list(ids)
    log_q = torch.log(torch.tensor([0.1 + 0.05 * (i % 5) for i in ids]))
    return dict(
        user_feats=users(len(ids), seed),
        pos_item_feats=items(ids, seed),
        pos_item_ids=torch.tensor(ids),
        log_q=log_q,
        ssl_item_feats=items([5, 6, 11, 12], seed + 1),
    )


def build(method="none", seed=0, **kw) -> TwoTowerTask:
    torch.manual_seed(seed)
    return TwoTowerTask(SPECS, make_cfg(method, **kw), MI)


@pytest.mark.parametrize("method", ["none", "fd", "so", "rfm", "rfm_no_compl", "cfm"])
def test_total_is_main_plus_alpha_ssl(method):
    task = build(method, alpha=0.7)
    out = task(**batch(0), generator=torch.Generator().manual_seed(0))
    assert set(out) == {"loss", "main", "ssl"}
    torch.testing.assert_close(out["loss"], out["main"] + 0.7 * out["ssl"])
    if method in ("none", "fd"):
        assert out["ssl"].item() == 0.0
    else:
        assert out["ssl"].item() > 0.0


@pytest.mark.parametrize("logq, hits", [(True, True), (False, False), (True, False)])
def test_main_loss_is_the_batch_softmax_of_the_towers(logq, hits):
    task = build("none", logq=logq, hits=hits)
    b = batch(1)
    out = task(**b, generator=torch.Generator().manual_seed(0))
    u = task.user_embeddings(b["user_feats"])
    i = task.item_embeddings(b["pos_item_feats"])
    ids = b["pos_item_ids"]
    ref = batch_softmax_loss(
        u,
        i,
        torch.arange(6),
        0.1,
        log_q=b["log_q"] if logq else None,
        query_item_ids=ids if hits else None,
        candidate_item_ids=ids if hits else None,
    )
    torch.testing.assert_close(out["main"], ref)


@pytest.mark.parametrize("method", ["rfm", "cfm", "rfm_no_compl"])
def test_ssl_gradients_reach_only_the_item_tower(method):
    task = build(method)
    out = task(**batch(2), generator=torch.Generator().manual_seed(3))
    out["ssl"].backward()
    item_params = {id(p) for p in task.item_tower.parameters()}
    own_user = [(n, p) for n, p in task.user_tower.named_parameters() if id(p) not in item_params]
    assert own_user  # user_id table and the user MLP
    for name, p in own_user:
        assert p.grad is None or bool((p.grad == 0).all()), name
    for name, p in task.item_tower.named_parameters():
        if name.startswith("mlp"):
            assert p.grad is not None and p.grad.abs().sum() > 0, name


@pytest.mark.parametrize("method", ["rfm", "cfm"])
def test_both_views_pass_through_the_item_tower_in_one_call(method):
    task = build(method)
    sizes = []
    task.item_tower.register_forward_pre_hook(lambda mod, args: sizes.append(args[0]["item_id"].shape[0]))
    task(**batch(0), generator=torch.Generator().manual_seed(0))
    assert sizes == [6, 8]  # the main batch, then both 4-item views concatenated


def test_fd_masks_positive_features_in_training_only():
    task = build("fd")
    seen = []
    task.item_tower.register_forward_pre_hook(lambda mod, args: seen.append(args[0]))
    ids = list(range(2, 20)) * 20
    b = batch(0, ids=ids)
    task.train()
    task(**b, generator=torch.Generator().manual_seed(0))
    masked = (seen[-1]["item_id"] == 0).double().mean().item()
    assert 0.35 < masked < 0.65  # fd_rate 0.5 over 360 rows
    task.eval()
    task(**b, generator=torch.Generator().manual_seed(0))
    assert torch.equal(seen[-1]["item_id"], b["pos_item_feats"]["item_id"])


def test_weights_all_ones_equal_no_weights():
    task = build("none")
    b = batch(4)
    g = torch.Generator()
    plain = task(**b, generator=g)["main"]
    ones = task(**b, generator=g, weights=torch.ones(6))["main"]
    twice = task(**b, generator=g, weights=torch.full((6,), 2.0))["main"]
    torch.testing.assert_close(plain, ones)
    torch.testing.assert_close(twice, 2 * plain)


@pytest.mark.parametrize("rank", [0, 1])
def test_gather_builds_global_candidates_and_labels(rank):
    task = build("none")
    b = batch(5, ids=(2, 3, 4))
    other_emb = torch.nn.functional.normalize(torch.randn(3, 8, generator=torch.Generator().manual_seed(1)), dim=-1)
    other_lq = torch.log(torch.tensor([0.3, 0.2, 0.1]))
    other_ids = torch.tensor([3, 10, 11])  # item 3 is also local row 1: an accidental hit

    def fixed(x):
        other = {torch.float32: other_emb if x.dim() == 2 else other_lq, torch.int64: other_ids}[x.dtype]
        parts = [x, other] if rank == 0 else [other, x]
        return torch.cat(parts)

    out = task(**b, generator=torch.Generator(), gather=fixed, rank=rank)
    u = task.user_embeddings(b["user_feats"])
    i = task.item_embeddings(b["pos_item_feats"])
    if rank == 0:
        cands, lq, ids, labels = (
            torch.cat([i, other_emb]),
            torch.cat([b["log_q"], other_lq]),
            torch.tensor([2, 3, 4, 3, 10, 11]),
            torch.tensor([0, 1, 2]),
        )
    else:
        cands, lq, ids, labels = (
            torch.cat([other_emb, i]),
            torch.cat([other_lq, b["log_q"]]),
            torch.tensor([3, 10, 11, 2, 3, 4]),
            torch.tensor([3, 4, 5]),
        )
    # Independent reference: explicit logits, accidental hit removed by hand.
    logits = u @ cands.T / 0.1 - lq
    hit_col = 3 if rank == 0 else 0  # the remote copy of item 3, local row 1's positive
    logits[1, hit_col] = float("-inf")
    ref = torch.nn.functional.cross_entropy(logits, labels)
    torch.testing.assert_close(out["main"], ref)


def grads(model) -> dict[str, torch.Tensor]:
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def simulate_two_workers(task, halves, exchange: bool) -> dict[str, torch.Tensor]:
    """Two data-parallel workers, each with its own model replica and half of the batch.

    ``gather`` returns the rank-ordered concatenation where the remote slice is a leaf holding the
    other worker's values. After each worker's backward, ``exchange`` sends the gradient each
    worker accumulated on its remote copies to the owner, which backpropagates it through its own
    slice: the reduce-scatter-sum backward of ``torch.distributed.nn.functional.all_gather``.
    Finally the replicas' gradients are averaged, as DDP does."""
    world = len(halves)
    replicas = [copy.deepcopy(task) for _ in range(world)]
    recorded = [[] for _ in range(world)]  # values each worker contributes, per gather call
    for k in range(world):

        def record(x, k=k):
            recorded[k].append(x.detach().clone())
            return torch.cat([x] * world)

        with torch.no_grad():
            replicas[k](**halves[k], generator=torch.Generator(), gather=record, rank=k)

    local_slices = [[] for _ in range(world)]
    remote_leaves = [[] for _ in range(world)]
    for k in range(world):
        calls = [0]

        def gather(x, k=k, calls=calls):
            c = calls[0]
            calls[0] += 1
            parts = []
            for r in range(world):
                if r == k:
                    local_slices[k].append(x)
                    parts.append(x)
                else:
                    leaf = recorded[r][c].clone().requires_grad_(x.requires_grad)
                    remote_leaves[k].append((r, c, leaf))
                    parts.append(leaf)
            return torch.cat(parts)

        out = replicas[k](**halves[k], generator=torch.Generator(), gather=gather, rank=k)
        out["loss"].backward(retain_graph=True)
    if exchange:
        for k in range(world):
            for r, c, leaf in remote_leaves[k]:
                if leaf.grad is not None:
                    local_slices[r][c].backward(leaf.grad, retain_graph=True)
    per_replica = [grads(m) for m in replicas]
    return {n: sum(g[n] for g in per_replica) / world for n in per_replica[0]}


def split_batch(b: dict, weights: torch.Tensor, lo: int, hi: int) -> dict:
    rows = torch.arange(lo, hi)

    def sel(feats):
        return {k: (v.index_select(rows) if isinstance(v, Ragged) else v[rows]) for k, v in feats.items()}

    return dict(
        user_feats=sel(b["user_feats"]),
        pos_item_feats=sel(b["pos_item_feats"]),
        pos_item_ids=b["pos_item_ids"][rows],
        log_q=b["log_q"][rows],
        ssl_item_feats=None,
        weights=weights[rows],
    )


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_two_workers_with_global_negatives_match_one_worker_with_twice_the_batch(seed):
    # float64, so that the comparison is exact up to summation order, not float32 rounding.
    task = build("none", seed=seed).double()
    # Items 3 and 2 appear on both workers: accidental hits across the gather.
    b = batch(seed, ids=(2, 3, 4, 3, 7, 2))
    b["log_q"] = b["log_q"].double()
    weights = torch.tensor([1.0, 0.5, 2.0, 1.5, 1.0, 0.25], dtype=torch.float64)

    single = copy.deepcopy(task)
    full = dict(b, ssl_item_feats=None, weights=weights)
    single(**full, generator=torch.Generator())["loss"].backward()
    expected = grads(single)

    halves = [split_batch(b, weights, 0, 3), split_batch(b, weights, 3, 6)]
    got = simulate_two_workers(task, halves, exchange=True)
    assert set(got) == set(expected)
    for name in expected:
        torch.testing.assert_close(got[name], expected[name], rtol=1e-10, atol=1e-12)

    # Treating the other worker's candidates as constants loses gradient: not the same.
    naive = simulate_two_workers(task, halves, exchange=False)
    diff = max((naive[n] - expected[n]).abs().max().item() for n in expected)
    assert diff > 1e-3


def test_missing_inputs_are_reported():
    task = build("rfm")
    b = batch(0)
    with pytest.raises(ValueError, match="ssl_item_feats"):
        task(**dict(b, ssl_item_feats=None), generator=torch.Generator())
    with pytest.raises(ValueError, match="log_q"):
        task(**dict(b, log_q=None), generator=torch.Generator())
    with pytest.raises(ValueError, match="no pair"):
        TwoTowerTask(SPECS, make_cfg("cfm"), {frozenset({"f_genre", "f_tags"}): 1.0})


def test_state_dict_round_trip():
    task = build("cfm", seed=0)
    other = build("cfm", seed=1)
    other.load_state_dict(task.state_dict())
    b = batch(0)
    torch.testing.assert_close(other.item_embeddings(b["pos_item_feats"]), task.item_embeddings(b["pos_item_feats"]))
    torch.testing.assert_close(other.user_embeddings(b["user_feats"]), task.user_embeddings(b["user_feats"]))
    # Tying survives loading: still one table.
    assert other.user_tower.embeddings["history"].weight is other.item_tower.embeddings["item_id"].weight
