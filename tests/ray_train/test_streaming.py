"""ray_train.streaming: the streamed catalogue on real Ray actors (the session's test cluster).

* the footer estimate equals the replicated catalogue's bytes, and the path choice;
* SSL sampling is exact uniform with replacement over the whole catalogue: positions -> items is a
  bijection onto the real items, every draw is that map applied to ``torch.randint`` positions of
  the (seed, epoch, rank) generator, a chi-square test over several seeds, every item (never-clicked
  ones included) reached, reproducible whatever the prefetching, and a mid-epoch resume continues
  the same stream;
* the positives denormalised by Ray Data equal ``Catalogue.lookup`` / ``load_log_q`` on the same rows
  (values and offsets of the multi-valued feature, log_q), through the real train Dataset pipeline.
"""

from __future__ import annotations


import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from common.features import FeatureSpec
from common.ragged import Ragged
from ray_train.data import (
    catalogue_bytes,
    item_features_from_table,
    iter_train_batches,
    load_catalogue,
    load_log_q,
    read_train_dataset,
    sampling_generator,
)
from ray_train.streaming import (
    MIN_SHARDS,
    REPLICATE_MAX_BYTES,
    CatalogueService,
    JoinPositives,
    UniformItemStream,
    choose_catalogue_mode,
    draw_positions,
    estimate_replicated_bytes,
    plan_shards,
)
from tests.ray_train.conftest import driver_of

SPECS = [
    FeatureSpec("item_id", "item", "id", False, "item_index", 160),
    FeatureSpec("category", "item", "categorical", False, "f_category", 7),
    FeatureSpec("tags", "item", "multi", True, "f_tags", 12),
    FeatureSpec("user_id", "user", "id", False, "user_index", 40),
    FeatureSpec("history", "user", "history", True, "history", 160, "item_id"),
]


def write_prepared(folder, items: np.ndarray, rng: np.random.Generator, empty_lists: bool = True) -> None:
    """``items/`` (shuffled rows, two files) and ``stats/item_popularity`` for item indices ``items``."""
    n = items.size
    lo = 0 if empty_lists else 1
    tags = [rng.integers(2, 12, rng.integers(lo, 4)).tolist() for _ in range(n)]
    table = pa.table({
        "item_index": pa.array(items, pa.int32()),
        "item_id": pa.array([f"i{i}" for i in items]),
        "f_category": pa.array(rng.integers(1, 7, n), pa.int32()),
        "f_tags": pa.array(tags, pa.list_(pa.int32())),
    }).take(pa.array(rng.permutation(n)))
    (folder / "items").mkdir(parents=True)
    pq.write_table(table.slice(0, n // 3), folder / "items" / "part-0.parquet")
    pq.write_table(table.slice(n // 3), folder / "items" / "part-1.parquet")
    pop = folder / "stats" / "item_popularity"
    pop.mkdir(parents=True)
    pq.write_table(pa.table({"item_index": pa.array(items[::-1], pa.int32()),
                             "log_q": -rng.random(n) * 5 - 0.1}), pop / "part-0.parquet")


def test_estimate_equals_the_replicated_bytes_and_the_mode_follows_the_threshold(tmp_path):
    rng = np.random.default_rng(0)
    items = np.sort(rng.choice(np.arange(2, 160), 70, replace=False))
    write_prepared(tmp_path, items, rng, empty_lists=False)  # an empty list would count as one value
    cat = load_catalogue(str(tmp_path), {}, SPECS)
    est_items, est = estimate_replicated_bytes(str(tmp_path / "items"), SPECS)
    assert est_items == 70
    # The estimate's row space is items + 2; the catalogue's is max(item_index) + 1 (gaps in between).
    rows = cat.num_rows
    exact = catalogue_bytes(cat, load_log_q(str(tmp_path), {}, cat))
    assert est - exact == (70 + 2 - rows) * (8 * 3 + 4)

    from common.config import ConfigError, load_config

    assert load_config(None).train.catalogue == "auto"
    assert load_config(None, ["train.catalogue=streaming"]).train.catalogue == "streaming"
    with pytest.raises(ConfigError, match="train.catalogue"):
        load_config(None, ["train.catalogue=sharded"])
    assert choose_catalogue_mode("auto", REPLICATE_MAX_BYTES) == "replicated"
    assert choose_catalogue_mode("auto", REPLICATE_MAX_BYTES + 1) == "streaming"
    assert choose_catalogue_mode("replicated", 10 * REPLICATE_MAX_BYTES) == "replicated"
    assert choose_catalogue_mode("streaming", 1) == "streaming"
    with pytest.raises(ValueError):
        choose_catalogue_mode("sharded", 1)
    assert plan_shards(1, 1000, 1) == MIN_SHARDS
    assert plan_shards(1, 1000, 5) == 5
    assert plan_shards(10 * 2**30, 10**8, 2) == 20
    assert plan_shards(10 * 2**30, 3, 2) == 3


@pytest.fixture(scope="module")
def ray_client(ray_cluster):
    """This process as a driver of the session's test cluster."""
    with driver_of(ray_cluster) as ray:
        yield ray


@pytest.fixture(scope="module")
def streamed(ray_client, tmp_path_factory):
    """A 60-item catalogue with gaps in item_index, in 3 shards over uneven ranges (the first
    shard's range holds few items)."""
    folder = tmp_path_factory.mktemp("streamed")
    rng = np.random.default_rng(1)
    items = np.sort(np.concatenate([[2, 3, 5], rng.choice(np.arange(60, 160), 57, replace=False)]))
    write_prepared(folder, items, rng)
    service = CatalogueService.start(
        str(folder / "items"), str(folder / "stats" / "item_popularity"), SPECS, num_shards=3, row_space=160
    )
    cat = load_catalogue(str(folder), {}, SPECS)
    try:
        yield folder, service, cat, load_log_q(str(folder), {}, cat)
    finally:
        service.shutdown()


def stream_items(service, seed, epoch, rank, batches, **kw) -> list[list[int]]:
    stream = UniformItemStream(service, SPECS, 64, sampling_generator(seed, epoch, rank), **kw)
    return [next(stream)["item_id"].tolist() for _ in range(batches)]


@pytest.mark.cluster
def test_ssl_sampling_is_exactly_uniform_with_replacement_over_the_whole_catalogue(streamed):
    from scipy.stats import chisquare

    _, service, cat, _ = streamed
    items = cat.item_indices.tolist()
    n = len(items)
    assert service.num_items == n and len(service.shards) == 3
    assert sorted(np.diff(service.starts).tolist())[0] == 3  # uneven shards: 3 items in the first

    # Exactness: position -> item is a bijection onto the real items, in item_index order ...
    assert service.rows_at(np.arange(n)).column("item_index").to_pylist() == items
    # ... and each SSL batch is that map applied to i.i.d. uniform torch.randint positions.
    g = sampling_generator(7, 2, 1)
    expect = [[items[p] for p in draw_positions(n, 64, g)] for _ in range(5)]
    assert stream_items(service, 7, 2, 1, 5) == expect

    # Statistics: frequencies match the uniform law (chi-square) for several seeds, every item
    # (never-clicked ones included: the catalogue knows no clicks) is reached, batches repeat items.
    for seed in range(3):
        draws = np.concatenate(stream_items(service, seed, 0, 0, 160))  # 10240 draws, ~171 per item
        counts = np.array([(draws == i).sum() for i in items])
        assert counts.sum() == draws.size and (counts > 0).all()
        assert chisquare(counts).pvalue > 1e-4, (seed, counts)
    batch = stream_items(service, 0, 0, 0, 1)[0]
    assert len(set(batch)) < len(batch)  # with replacement

    # Seeded per (seed, epoch, rank); prefetching (chunk size, depth) never changes the stream.
    a = stream_items(service, 3, 1, 0, 12)
    assert a == stream_items(service, 3, 1, 0, 12, chunk_batches=5, depth=3)
    assert a != stream_items(service, 3, 1, 1, 12) and a != stream_items(service, 3, 2, 0, 12)
    # A mid-epoch resume after k steps continues the same stream.
    assert stream_items(service, 3, 1, 0, 7, start_batch=5) == a[5:]


def assert_features_equal(got, ref, what):
    assert set(got) == set(ref), what
    for name in ref:
        a, b = got[name], ref[name]
        assert type(a) is type(b), (what, name)
        if isinstance(b, Ragged):
            assert a.values.tolist() == b.values.tolist(), (what, name)
            assert a.offsets.tolist() == b.offsets.tolist(), (what, name)
        else:
            assert a.dtype == b.dtype and a.tolist() == b.tolist(), (what, name)


@pytest.mark.cluster
def test_denormalised_positives_equal_catalogue_lookup(streamed):
    folder, service, cat, log_q = streamed
    rng = np.random.default_rng(5)
    # The catalogue's features as item_features_from_table reads them from the shards.
    everything = service.rows_at(np.arange(service.num_items))
    assert_features_equal(item_features_from_table(everything, SPECS), cat.lookup(cat.item_indices), "all items")

    # The Ray Data stage on a chunked, sliced batch: columns appended, rows kept in order.
    clicked = rng.choice(cat.item_indices.numpy(), 300)  # repeats; some items never clicked
    train = pa.table({
        "item_index": pa.array(clicked, pa.int32()),
        "user_index": pa.array(np.arange(2, 302), pa.int32()),  # identifies rows after shuffles
        "history": pa.array([rng.integers(2, 160, rng.integers(0, 4)).tolist() for _ in range(300)],
                            pa.list_(pa.int32())),
        "timestamp": pa.array(np.arange(300), pa.int64()),
    })
    batch = pa.concat_tables([train.slice(0, 100), train.slice(100)]).slice(40, 200)
    joined = JoinPositives(service)(batch)
    assert joined.column_names[: batch.num_columns] == batch.column_names
    assert joined.column("pos__log_q").type == pa.float32()
    ref_rows = torch.from_numpy(clicked[40:240].astype(np.int64))
    assert_features_equal(item_features_from_table(joined, SPECS, "pos__"), cat.lookup(ref_rows), "join")

    # Through the real train Dataset (blocks, seeded block order, collate, local shuffle).
    (folder / "train").mkdir(exist_ok=True)
    pq.write_table(train.slice(0, 130), folder / "train" / "part-0.parquet")
    pq.write_table(train.slice(130), folder / "train" / "part-1.parquet")
    ds = read_train_dataset(str(folder), {}, SPECS, seed=0, batch_size=16, catalogue_service=service)
    item_of = dict(zip(train.column("user_index").to_pylist(), clicked.tolist()))
    rows = 0
    for tb in iter_train_batches(ds, SPECS, 16, shuffle_seed=1, positives=True):
        users = tb.user["user_id"].tolist()
        assert tb.item_index.tolist() == [item_of[u] for u in users]
        assert_features_equal(tb.item, cat.lookup(tb.item_index), "train batch")
        assert tb.log_q.dtype == torch.float32
        assert torch.equal(tb.log_q, log_q[tb.item_index])
        rows += tb.num_rows
    assert rows == 300 // 16 * 16

    with pytest.raises(KeyError, match=r"item_index \[4\] not in the catalogue"):
        service.lookup(np.array([2, 4]))
