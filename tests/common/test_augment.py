import math
import random

import pytest
import torch

from common.augment import (
    apply_mask,
    cfm_masks,
    feature_dropout,
    make_views,
    multi_value_dropout,
    mutual_info_from_records,
    rfm_masks,
    rfm_no_compl_masks,
)
from common.config import SSLConfig
from common.features import FeatureSpec
from common.ragged import Ragged

SPECS = [
    FeatureSpec("item_id", "item", "id", False, "item_index", 50),
    FeatureSpec("genre", "item", "categorical", False, "f_genre", 8),
    FeatureSpec("tags", "item", "multi", True, "f_tags", 20),
    FeatureSpec("price", "item", "bucketized", False, "f_price", 6),
    FeatureSpec("brand", "item", "categorical", False, "f_brand", 9),
    FeatureSpec("user_id", "user", "id", False, "user_index", 9),
]
NAMES = ["item_id", "genre", "tags", "price", "brand"]  # k = 5: masked sets of 2 and 3

# Hand-written MI table; pairs not listed count as 0.
MI = {
    frozenset({"genre", "tags"}): 0.9,
    frozenset({"price", "brand"}): 0.7,
    frozenset({"genre", "brand"}): 0.8,
    frozenset({"item_id", "price"}): 0.3,
    frozenset({"item_id", "genre"}): 0.2,
    frozenset({"tags", "price"}): 0.1,
}
# floor(5/2) = 2: the seed plus its single highest-MI partner.
EXPECTED_CFM = {
    "item_id": {"item_id", "price"},  # 0.3 beats genre's 0.2
    "genre": {"genre", "tags"},  # 0.9
    "tags": {"tags", "genre"},  # 0.9
    "price": {"price", "brand"},  # 0.7
    "brand": {"brand", "genre"},  # 0.8 beats price's 0.7
}


def item_batch(seed: int, n: int = 6) -> dict:
    rng = random.Random(seed)
    return {
        "item_id": torch.tensor([rng.randrange(2, 50) for _ in range(n)]),
        "genre": torch.tensor([rng.randrange(1, 8) for _ in range(n)]),
        "tags": Ragged.from_lists([[rng.randrange(2, 20) for _ in range(rng.choice([0, 1, 3]))] for _ in range(n)]),
        "price": torch.tensor([rng.randrange(2, 6) for _ in range(n)]),
        "brand": torch.tensor([rng.randrange(2, 9) for _ in range(n)]),
    }


def clone_batch(feats):
    return {k: (Ragged(v.values.clone(), v.offsets.clone()) if isinstance(v, Ragged) else v.clone()) for k, v in feats.items()}


def assert_same_batch(a, b):
    assert set(a) == set(b)
    for k in a:
        if isinstance(a[k], Ragged):
            assert a[k].tolist() == b[k].tolist(), k
        else:
            assert torch.equal(a[k], b[k]), k


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


@pytest.mark.parametrize("names", [NAMES, NAMES[:4], NAMES[:1]])
def test_rfm_masks_are_complementary_halves(names):
    k = len(names)
    seen_in_first = {n: 0 for n in names}
    for seed in range(40):
        m1, m2 = rfm_masks(names, gen(seed))
        assert m1 | m2 == set(names)
        assert not m1 & m2
        assert (len(m1), len(m2)) == (k // 2, math.ceil(k / 2))
        for n in m1:
            seen_in_first[n] += 1
    if k > 1:
        # The split is random: every feature lands in each view in some batch.
        assert all(0 < c < 40 for c in seen_in_first.values())


def test_cfm_masks_seed_plus_top_mi_partners():
    outcomes = set()
    for seed in range(60):
        m1, m2 = cfm_masks(NAMES, MI, gen(seed))
        assert m1 in [frozenset(v) for v in EXPECTED_CFM.values()], m1
        assert m1 | m2 == set(NAMES) and not m1 & m2
        outcomes.add(m1)
    # Every seed feature gets drawn ({genre, tags} arises from two seeds): 4 distinct sets.
    assert len(outcomes) == 4


def test_cfm_masks_even_k_and_ties():
    names = ["a", "b", "c", "d", "e", "f"]  # k = 6: the seed plus its top 2 partners
    mi = {
        frozenset({"a", "b"}): 0.8,
        frozenset({"a", "c"}): 0.6,
        frozenset({"a", "d"}): 0.7,
        frozenset({"e", "f"}): 0.4,
    }
    expected = {
        "a": {"a", "b", "d"},
        "b": {"b", "a", "c"},  # a: 0.8, then all 0: tie broken by name order -> c
        "c": {"c", "a", "b"},  # a: 0.6, then tie -> b
        "d": {"d", "a", "b"},
        "e": {"e", "f", "a"},
        "f": {"f", "e", "a"},
    }
    seen = set()
    for seed in range(80):
        m1, m2 = cfm_masks(names, mi, gen(seed))
        assert len(m1) == 3 and m2 == set(names) - m1
        assert m1 in [frozenset(v) for v in expected.values()], m1
        seen.add(m1)
    assert seen == {frozenset(v) for v in expected.values()}


def test_cfm_rejects_a_table_without_these_features():
    with pytest.raises(ValueError, match="no pair"):
        cfm_masks(NAMES, {frozenset({"f_genre", "f_tags"}): 1.0}, gen(0))


def test_rfm_no_compl_masks_are_independent():
    n_seeds = 400
    masked = [0, 0]
    both = 0
    not_complementary = 0
    for seed in range(n_seeds):
        m1, m2 = rfm_no_compl_masks(NAMES, gen(seed))
        masked[0] += len(m1)
        masked[1] += len(m2)
        both += len(m1 & m2)
        if (m1 | m2) != set(NAMES) or (m1 & m2):
            not_complementary += 1
    n = n_seeds * len(NAMES)
    for count in masked:  # each mask: Bernoulli(1/2) per feature
        assert abs(count / n - 0.5) < 4 * math.sqrt(0.25 / n)
    # Independent views: masked in both with probability 1/4 (complementary masks would give 0).
    assert abs(both / n - 0.25) < 4 * math.sqrt(0.25 * 0.75 / n)
    assert not_complementary > n_seeds * 0.9


def test_apply_mask_sets_default_values_without_mutating():
    feats = item_batch(0)
    before = clone_batch(feats)
    out = apply_mask(feats, SPECS, {"genre", "tags"})
    assert out["genre"].tolist() == [0] * 6
    assert out["tags"].tolist() == [[0]] * 6
    assert out["tags"].values.dtype == torch.int64
    for name in ("item_id", "price", "brand"):
        assert torch.equal(out[name], feats[name])
    assert_same_batch(feats, before)
    with pytest.raises(KeyError, match="colour"):
        apply_mask(feats, SPECS, {"colour"})


@pytest.mark.parametrize("seed", range(3))
def test_multi_value_dropout_rate_and_refill(seed):
    rate = 0.3
    rng = random.Random(seed)
    rows = [[rng.randrange(2, 20) for _ in range(10)] for _ in range(1000)]  # 10k values, all >= 2
    rows += [[5]] * 1000 + [[]] * 50  # single-value rows (refill case) and empty rows
    feats = {"tags": Ragged.from_lists(rows), "genre": torch.arange(len(rows))}
    before = clone_batch(feats)
    out = multi_value_dropout(feats, SPECS, rate, gen(seed))
    got = out["tags"].tolist()
    kept = sum(len([v for v in r if v >= 2]) for r in got[:1000])
    n = 10_000
    assert abs((1 - kept / n) - rate) < 4 * math.sqrt(rate * (1 - rate) / n)
    for src, dst in zip(rows, got):
        if not src:
            assert dst == []  # empty rows stay empty
        elif dst == [0]:
            pass  # lost every value: default value
        else:
            # A subsequence of the source row: order kept, nothing invented.
            it = iter(src)
            assert all(v in it for v in dst) and dst
    refilled = sum(1 for dst in got[1000:2000] if dst == [0])
    assert abs(refilled / 1000 - rate) < 4 * math.sqrt(rate * (1 - rate) / 1000)
    assert torch.equal(out["genre"], feats["genre"])
    assert_same_batch(feats, before)


@pytest.mark.parametrize("seed", range(3))
def test_feature_dropout_rate_and_default_values(seed):
    rate = 0.2
    n = 10_000
    g = torch.Generator().manual_seed(100 + seed)
    feats = {
        "item_id": torch.randint(2, 50, (n,), generator=g),
        "tags": Ragged.from_lengths(torch.randint(2, 20, (2 * n,), generator=g), torch.full((n,), 2)),
    }
    before = clone_batch(feats)
    out = feature_dropout(feats, SPECS, rate, gen(seed))
    dropped_id = out["item_id"] == 0
    assert torch.equal(out["item_id"][~dropped_id], feats["item_id"][~dropped_id])
    tags_rows, src_rows = out["tags"].tolist(), feats["tags"].tolist()
    dropped_tags = torch.tensor([r == [0] for r in tags_rows])
    assert all(d == s for d, s, m in zip(tags_rows, src_rows, dropped_tags.tolist()) if not m)
    bound = 4 * math.sqrt(rate * (1 - rate) / n)
    assert abs(dropped_id.double().mean().item() - rate) < bound
    assert abs(dropped_tags.double().mean().item() - rate) < bound
    # Features drop independently of each other.
    both = (dropped_id & dropped_tags).double().mean().item()
    assert abs(both - rate**2) < 4 * math.sqrt(rate**2 * (1 - rate**2) / n)
    assert_same_batch(feats, before)


@pytest.mark.parametrize("method", ["rfm", "cfm", "rfm_no_compl"])
def test_make_views_masks_and_is_reproducible(method):
    cfg = SSLConfig(method=method, multi_value_dropout=False)
    for seed in range(5):
        feats = item_batch(seed)
        before = clone_batch(feats)
        v1, v2 = make_views(feats, SPECS, cfg, MI, gen(seed))
        again = make_views(feats, SPECS, cfg, MI, gen(seed))
        assert_same_batch(v1, again[0])
        assert_same_batch(v2, again[1])
        assert_same_batch(feats, before)
        assert set(v1) == set(NAMES)

        def masked(view):
            out = set()
            for name in NAMES:
                x = view[name]
                is_default = x.tolist() == [[0]] * 6 if isinstance(x, Ragged) else bool((x == 0).all())
                if is_default:
                    out.add(name)
                else:  # an unmasked feature passes through unchanged
                    assert (x.tolist() == feats[name].tolist()), name
            return out

        m1, m2 = masked(v1), masked(v2)
        if method != "rfm_no_compl":
            assert m1 | m2 == set(NAMES) and not m1 & m2
        if method == "cfm":
            assert m1 in EXPECTED_CFM.values()


def test_make_views_applies_multi_value_dropout():
    cfg = SSLConfig(method="rfm", multi_value_dropout=True, dropout_rate=0.5)
    rng = random.Random(0)
    n = 2000
    feats = {
        "item_id": torch.arange(2, n + 2),
        "genre": torch.full((n,), 2),
        "tags": Ragged.from_lists([[rng.randrange(2, 20) for _ in range(5)] for _ in range(n)]),
        "price": torch.full((n,), 2),
        "brand": torch.full((n,), 2),
    }
    def unmasked_tags(v1, v2):
        # rfm masks tags in exactly one view; there every row is [0] (dropout refills it with 0).
        rows = [v["tags"].tolist() for v in (v1, v2)]
        masked = [all(r == [0] for r in rs) for rs in rows]
        assert sorted(masked) == [False, True]
        return rows[masked.index(False)]

    total = 5 * n
    for seed in range(4):
        rows = unmasked_tags(*make_views(feats, SPECS, cfg, MI, gen(seed)))
        kept = sum(len([v for v in r if v >= 2]) for r in rows)
        assert abs((1 - kept / total) - 0.5) < 4 * math.sqrt(0.25 / total)
    off = SSLConfig(method="rfm", multi_value_dropout=False, dropout_rate=0.5)
    assert unmasked_tags(*make_views(feats, SPECS, off, MI, gen(0))) == feats["tags"].tolist()


def test_make_views_rejects_methods_without_views():
    with pytest.raises(ValueError, match="no contrastive task"):
        make_views(item_batch(0), SPECS, SSLConfig(method="so"), MI, gen(0))
    feats = item_batch(0)
    del feats["price"]
    with pytest.raises(KeyError, match="price"):
        make_views(feats, SPECS, SSLConfig(method="rfm"), MI, gen(0))


def test_mutual_info_from_records():
    recs = [
        {"feature_a": "genre", "feature_b": "tags", "mi": 0.9, "nmi": 0.5},
        {"feature_a": "tags", "feature_b": "genre", "mi": 0.9, "nmi": 0.5},
        {"feature_a": "price", "feature_b": "price", "mi": 1.2, "nmi": 1.0},
    ]
    assert mutual_info_from_records(recs) == {frozenset({"genre", "tags"}): 0.9}
    with pytest.raises(KeyError, match="mi"):
        mutual_info_from_records([{"feature_a": "a", "feature_b": "b"}])
