"""Retrieval metrics against hand arithmetic, sklearn and brute-force numpy references."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from scipy.sparse import csr_matrix
from sklearn.metrics import ndcg_score

from common.metrics import (
    COLD,
    HEAD,
    TAIL,
    bucket_counts,
    bucket_recall,
    item_buckets,
    merge_topk,
    ndcg_at_k,
    popularity_deciles,
    recall_at_k,
    retrieval_metrics,
    to_csr,
    topk_excluding,
)
from common.ragged import Ragged

SEEDS = (0, 1, 2, 3)


# ---------------------------------------------------------------------------------------------
# Hand-computed recall and NDCG
# ---------------------------------------------------------------------------------------------


def test_recall_and_ndcg_by_hand():
    top = np.array([[5, 3, 9, 2], [1, 4, 6, 8], [7, 8, 9, 10]])
    truth = [[3, 2, 7, 3], [4], []]  # user 0's duplicate 3 counts once; user 2 has no truth
    L = math.log2
    # user 0, G = {2, 3, 7}:  @2 -> [5, 3]: one hit at position 1 -> recall 1/3,
    #   DCG = 1/log2(3), IDCG over min(3, 2) = 2 slots = 1/log2(2) + 1/log2(3).
    # user 1, G = {4}:        @2 -> [1, 4]: hit at position 1 -> recall 1, DCG = 1/log2(3), IDCG = 1.
    # user 2 is skipped (no ground truth).
    u0_ndcg2 = (1 / L(3)) / (1 + 1 / L(3))
    u1_ndcg = 1 / L(3)
    assert recall_at_k(top, truth, 2) == pytest.approx((1 / 3 + 1) / 2)
    assert ndcg_at_k(top, truth, 2) == pytest.approx((u0_ndcg2 + u1_ndcg) / 2)
    # @4: user 0 -> [5, 3, 9, 2]: hits at positions 1 and 3 -> recall 2/3,
    #   DCG = 1/log2(3) + 1/log2(5), IDCG over min(3, 4) = 3 slots = 1 + 1/log2(3) + 1/log2(4).
    u0_ndcg4 = (1 / L(3) + 1 / L(5)) / (1 + 1 / L(3) + 1 / L(4))
    m = retrieval_metrics(top, truth, [2, 4])
    assert m["recall@4"] == pytest.approx((2 / 3 + 1) / 2)
    assert m["ndcg@4"] == pytest.approx((u0_ndcg4 + u1_ndcg) / 2)
    assert m["recall@2"] == pytest.approx(2 / 3)
    # Numerically: 0.50889 and 0.56456.
    assert m["ndcg@2"] == pytest.approx(0.508890, abs=1e-5)
    assert m["ndcg@4"] == pytest.approx(0.564560, abs=1e-5)


def test_empty_slots_never_hit_and_no_users_is_nan():
    top = np.array([[-1, -1], [3, -1]])
    assert recall_at_k(top, [[1], [3]], 2) == pytest.approx(0.5)
    assert math.isnan(recall_at_k(top, [[], []], 2))
    with pytest.raises(ValueError, match="only hold 2"):
        recall_at_k(top, [[1], [3]], 3)


@pytest.mark.parametrize("seed", SEEDS)
def test_ndcg_matches_sklearn(seed):
    rng = np.random.default_rng(seed)
    users, items, k = 30, 40, 7
    scores = rng.normal(size=(users, items))
    rel = (rng.random((users, items)) < 0.1).astype(int)
    rel[rel.sum(1) == 0, rng.integers(items)] = 1  # sklearn scores users without truth as 0
    top = np.argsort(-scores, axis=1)[:, :k]
    truth = [np.flatnonzero(r) for r in rel]
    assert ndcg_at_k(top, truth, k) == pytest.approx(ndcg_score(rel, scores, k=k), abs=1e-12)
    ref_recall = np.mean([len(set(top[u]) & set(truth[u])) / len(truth[u]) for u in range(users)])
    assert recall_at_k(top, truth, k) == pytest.approx(ref_recall, abs=1e-12)


def test_row_set_formats_agree():
    lists = [[4, 2], [], [7, 7, 3]]
    flat = torch.tensor([4, 2, 7, 7, 3])
    ragged = Ragged(flat, torch.tensor([0, 2, 2]))
    csr = csr_matrix((np.ones(5), flat.numpy(), np.array([0, 2, 2, 5])), shape=(3, 10))
    ref = to_csr(lists, 3)
    for other in (ragged, csr):
        ptr, idx = to_csr(other, 3)
        np.testing.assert_array_equal(ptr, ref[0])
        np.testing.assert_array_equal(idx, ref[1])
    with pytest.raises(ValueError, match="describe 3 users .* have 4"):
        to_csr(lists, 4)


# ---------------------------------------------------------------------------------------------
# Exact top-K with exclusions
# ---------------------------------------------------------------------------------------------


def _reference_topk(user, item, rows, k, exclude):
    """Brute force: score every pair, drop exclusions, sort by (score desc, row asc)."""
    out_s, out_r = [], []
    for u in range(user.shape[0]):
        cand = [(float(user[u] @ item[j]), int(rows[j])) for j in range(item.shape[0]) if rows[j] not in exclude[u]]
        cand.sort(key=lambda t: (-t[0], t[1]))
        cand = cand[:k] + [(-math.inf, -1)] * max(0, k - len(cand))
        out_s.append([s for s, _ in cand])
        out_r.append([r for _, r in cand])
    return np.array(out_s), np.array(out_r)


def _random_case(seed, users=13, items=29, dim=4, integer=False):
    g = torch.Generator().manual_seed(seed)
    if integer:  # small integer embeddings: many exactly tied scores
        u = torch.randint(-2, 3, (users, dim), generator=g).double()
        it = torch.randint(-2, 3, (items, dim), generator=g).double()
    else:
        u, it = torch.randn(users, dim, generator=g).double(), torch.randn(items, dim, generator=g).double()
    rows = torch.randperm(items * 3, generator=g)[:items] + 2  # sparse, unordered catalogue rows
    rng = np.random.default_rng(seed)
    exclude = [set(rng.choice(rows.numpy(), size=rng.integers(0, items), replace=False).tolist()) for _ in range(users)]
    exclude[0] = set(rows.tolist())  # one user with everything excluded: all slots empty
    return u, it, rows, exclude


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("integer", [False, True])
def test_topk_excluding_matches_brute_force(seed, integer):
    u, it, rows, exclude = _random_case(seed, integer=integer)
    k = 11
    s, r = topk_excluding(u, it, k, exclude=[sorted(e) for e in exclude], candidate_rows=rows)
    ref_s, ref_r = _reference_topk(u.numpy(), it.numpy(), rows.numpy(), k, exclude)
    np.testing.assert_array_equal(r.numpy(), ref_r)
    np.testing.assert_allclose(s.numpy(), ref_s, rtol=0, atol=1e-12)
    for uidx in range(u.shape[0]):
        assert not (set(r[uidx].tolist()) & exclude[uidx])
    assert (r[0] == -1).all() and torch.isneginf(s[0]).all()


@pytest.mark.parametrize("seed", SEEDS)
def test_chunked_equals_unchunked(seed):
    u, it, rows, exclude = _random_case(seed, users=17, integer=seed % 2 == 0)
    ex = [sorted(e) for e in exclude]
    full = topk_excluding(u, it, 9, exclude=ex, candidate_rows=rows, chunk_size=10_000)
    for chunk in (1, 3, 16):
        part = topk_excluding(u, it, 9, exclude=ex, candidate_rows=rows, chunk_size=chunk)
        # Rows are exact; scores may differ in the last bit (BLAS blocks depend on the shape).
        assert torch.equal(part[1], full[1])
        torch.testing.assert_close(part[0], full[0], rtol=0, atol=1e-12)


@pytest.mark.parametrize("seed", SEEDS)
def test_sharded_then_merged_equals_single(seed):
    u, it, rows, exclude = _random_case(seed, integer=seed % 2 == 1)
    ex = [sorted(e) for e in exclude]
    k = 8
    single = topk_excluding(u, it, k, exclude=ex, candidate_rows=rows)
    # Random, interleaved shards of uneven size, one smaller than k.
    perm = torch.randperm(rows.shape[0], generator=torch.Generator().manual_seed(seed + 100))
    cuts = [0, 3, 15, rows.shape[0]]
    parts = []
    for a, b in zip(cuts[:-1], cuts[1:]):
        sel = perm[a:b]
        parts.append(topk_excluding(u, it[sel], k, exclude=ex, candidate_rows=rows[sel]))
    merged = merge_topk(parts)
    assert torch.equal(merged[1], single[1])
    torch.testing.assert_close(merged[0], single[0], rtol=0, atol=1e-12)


def test_excluded_rows_outside_the_shard_are_ignored():
    u = torch.tensor([[1.0, 0.0]])
    it = torch.tensor([[3.0, 0.0], [2.0, 0.0], [1.0, 0.0]])
    s, r = topk_excluding(u, it, 2, exclude=Ragged(torch.tensor([11, 999]), torch.tensor([0])),
                          candidate_rows=torch.tensor([10, 11, 12]))
    assert r.tolist() == [[10, 12]] and s.tolist() == [[3.0, 1.0]]


# ---------------------------------------------------------------------------------------------
# Buckets and deciles
# ---------------------------------------------------------------------------------------------


def _reference_buckets(counts, frac, real):
    order = sorted(real, key=lambda r: (-counts[r], r))
    n_head = math.ceil(frac * len(order))
    codes = {}
    for pos, r in enumerate(order):
        codes[r] = COLD if counts[r] == 0 else (HEAD if pos < n_head else TAIL)
    return codes


@pytest.mark.parametrize("seed", SEEDS)
def test_item_buckets_match_reference(seed):
    rng = np.random.default_rng(seed)
    n = 60
    counts = rng.integers(0, 6, size=n)  # many ties and zeros
    counts[:2] = 1000  # reserved rows 0 and 1 are not items, whatever their count
    real = np.arange(2, n)
    for frac in (0.05, 0.1, 0.5, 0.9):
        codes = item_buckets(counts, frac, real)
        assert codes[0] == codes[1] == -1
        ref = _reference_buckets(counts, frac, real.tolist())
        assert {r: int(codes[r]) for r in real} == ref


@pytest.mark.parametrize("seed", SEEDS)
def test_bucket_recall_matches_loop(seed):
    rng = np.random.default_rng(seed)
    n, users, k = 40, 25, 5
    counts = rng.integers(0, 4, size=n)
    codes = item_buckets(counts, 0.2, np.arange(2, n))
    top = np.stack([rng.choice(np.arange(2, n), size=k, replace=False) for _ in range(users)])
    truth = [rng.choice(np.arange(2, n), size=rng.integers(0, 6), replace=False).tolist() for _ in range(users)]
    got = bucket_recall(top, truth, codes, [k])
    cnt = bucket_counts(truth, users, codes)
    for code, name in ((HEAD, "head"), (TAIL, "tail"), (COLD, "cold")):
        vals, pairs = [], 0
        for u in range(users):
            g = {r for r in truth[u] if codes[r] == code}
            pairs += len(g)
            if g:
                vals.append(len(g & set(top[u].tolist())) / len(g))
        assert cnt[name] == {"pairs": pairs, "users": len(vals)}
        if vals:
            assert got[name][f"recall@{k}"] == pytest.approx(np.mean(vals))
        else:
            assert math.isnan(got[name][f"recall@{k}"])


def test_popularity_deciles_partition_the_catalogue():
    rng = np.random.default_rng(0)
    n, users, k = 52, 20, 6
    counts = rng.integers(0, 9, size=n)
    real = np.arange(2, n)
    top = np.stack([rng.choice(real, size=k, replace=False) for _ in range(users)])
    truth = [rng.choice(real, size=3, replace=False).tolist() for _ in range(users)]
    groups = popularity_deciles(top, truth, counts, real, k)
    assert [g["group"] for g in groups] == list(range(10))
    assert sum(g["items"] for g in groups) == real.size
    assert all(a["min_count"] >= b["max_count"] for a, b in zip(groups, groups[1:]))
    order = sorted(real.tolist(), key=lambda r: (-counts[r], r))
    first = set(order[: groups[0]["items"]])
    vals = [len(set(t) & first & set(top[u].tolist())) / len(set(t) & first)
            for u, t in enumerate(truth) if set(t) & first]
    assert groups[0]["users"] == len(vals)
    assert groups[0][f"recall@{k}"] == pytest.approx(np.mean(vals))
