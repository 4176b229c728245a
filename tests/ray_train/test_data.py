"""ray_train.data: the Arrow -> Ragged collate against a Python reference (sliced, chunked, empty
rows), the loaders' checks, seeds, and equal batch counts per rank through Ray Data."""

from __future__ import annotations


import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from common.features import FeatureSpec
from common.ragged import Ragged
from ray_train.data import (
    TrainBatch,
    arrow_to_long,
    arrow_to_ragged,
    collate_table,
    derive_seed,
    epoch_generator,
    iter_train_batches,
    load_log_q,
    shuffle_seed,
    steps_per_epoch,
    train_columns,
)
from tests.ray_train.conftest import driver_of


def random_lists(rng: np.random.Generator, n: int, max_len: int = 5) -> list[list[int]]:
    return [rng.integers(0, 50, rng.integers(0, max_len + 1)).tolist() for _ in range(n)]


def reference_ragged(rows: list[list[int]]) -> tuple[list[int], list[int]]:
    """EmbeddingBag layout by hand: flat values, row starts."""
    values, offsets, pos = [], [], 0
    for r in rows:
        offsets.append(pos)
        values.extend(r)
        pos += len(r)
    return values, offsets


@pytest.mark.parametrize("seed", [0, 1, 2, 3])
def test_arrow_to_ragged_matches_reference_plain_sliced_chunked(seed):
    rng = np.random.default_rng(seed)
    rows = random_lists(rng, 40)
    arr = pa.array(rows, pa.list_(pa.int32()))

    for what, column, expect in [
        ("plain", arr, rows),
        ("slice", arr.slice(7, 20), rows[7:27]),
        ("slice-at-end", arr.slice(33), rows[33:]),
        ("chunked", pa.chunked_array([arr.slice(0, 13), arr.slice(13, 5), arr.slice(18)]), rows),
        ("chunked-sliced", pa.chunked_array([arr.slice(3, 10), arr.slice(25, 9)]), rows[3:13] + rows[25:34]),
        ("large_list", pa.array(rows, pa.large_list(pa.int32())).slice(5, 30), rows[5:35]),
    ]:
        r = arrow_to_ragged(column, what)
        values, offsets = reference_ragged(expect)
        assert r.values.dtype == torch.int64 and r.offsets.dtype == torch.int64, what
        assert r.values.tolist() == values, what
        assert r.offsets.tolist() == offsets, what
        assert r.tolist() == expect, what


def test_arrow_to_ragged_empty_rows_and_empty_column():
    r = arrow_to_ragged(pa.array([[], [3], [], [], [4, 5]], pa.list_(pa.int32())))
    assert r.values.tolist() == [3, 4, 5]
    assert r.offsets.tolist() == [0, 0, 1, 1, 1]
    empty = arrow_to_ragged(pa.chunked_array([], pa.list_(pa.int32())))
    assert empty.values.numel() == 0 and empty.offsets.numel() == 0


def test_arrow_to_ragged_rejects_nulls_and_scalars():
    with pytest.raises(ValueError, match="null lists"):
        arrow_to_ragged(pa.array([[1], None, [2]], pa.list_(pa.int32())), "train/history")
    with pytest.raises(TypeError, match="list<int32>"):
        arrow_to_ragged(pa.array([1, 2], pa.int32()))
    with pytest.raises(ValueError, match="nulls"):
        arrow_to_long(pa.array([1, None], pa.int32()), "train/f_region")


USER_SPECS = [
    FeatureSpec("item_id", "item", "id", False, "item_index", 60),
    FeatureSpec("user_id", "user", "id", False, "user_index", 30),
    FeatureSpec("region", "user", "categorical", False, "f_region", 5),
    FeatureSpec("history", "user", "history", True, "history", 60, "item_id"),
    FeatureSpec("langs", "user", "multi", True, "f_langs", 9),
]


def random_train_table(rng: np.random.Generator, n: int) -> pa.Table:
    return pa.table({
        "user_id": pa.array([f"u{i}" for i in range(n)]),
        "item_index": pa.array(rng.integers(2, 60, n), pa.int32()),
        "user_index": pa.array(rng.integers(2, 30, n), pa.int32()),
        "f_region": pa.array(rng.integers(1, 5, n), pa.int32()),
        "history": pa.array(random_lists(rng, n, 6), pa.list_(pa.int32())),
        "f_langs": pa.array(random_lists(rng, n, 2), pa.list_(pa.int32())),
        "timestamp": pa.array(np.arange(n), pa.int64()),
    })


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_collate_table_sliced_and_chunked_matches_rows(seed):
    rng = np.random.default_rng(seed)
    table = random_train_table(rng, 50)
    # A batch as Ray Data hands it over: a slice of two concatenated blocks (chunked columns).
    batch = pa.concat_tables([table.slice(0, 17), table.slice(17)]).slice(9, 30)
    assert batch.column("history").num_chunks == 2
    out = collate_table(batch, USER_SPECS)
    rows = batch.to_pylist()
    assert isinstance(out, TrainBatch) and out.num_rows == 30
    assert out.item_index.tolist() == [r["item_index"] for r in rows]
    assert out.user["user_id"].tolist() == [r["user_index"] for r in rows]
    assert out.user["region"].tolist() == [r["f_region"] for r in rows]
    assert out.user["history"].tolist() == [r["history"] for r in rows]
    assert out.user["langs"].tolist() == [r["f_langs"] for r in rows]
    assert set(out.user) == {"user_id", "region", "history", "langs"}  # item side is not a user feature


def test_train_batch_slice_equals_collating_the_slice():
    table = random_train_table(np.random.default_rng(4), 37)
    whole = collate_table(table, USER_SPECS)
    for start, length in [(0, 10), (10, 10), (30, 7), (36, 1), (5, 0)]:
        part = whole.slice(start, length)
        ref = collate_table(table.slice(start, length), USER_SPECS)
        assert part.item_index.tolist() == ref.item_index.tolist()
        for name in ref.user:
            a, b = part.user[name], ref.user[name]
            assert a.tolist() == b.tolist(), (name, start, length)
            if isinstance(a, Ragged):
                assert a.offsets.tolist() == b.offsets.tolist() and a.values.tolist() == b.values.tolist()


def test_collate_table_names_missing_columns():
    table = random_train_table(np.random.default_rng(0), 5).drop_columns(["history"])
    with pytest.raises(ValueError, match=r"lacks column\(s\) \['history'\]"):
        collate_table(table, USER_SPECS)


def test_train_columns_are_item_plus_user_side():
    assert train_columns(USER_SPECS) == ["item_index", "user_index", "f_region", "history", "f_langs"]


def test_steps_per_epoch_is_floor_of_equal_split():
    assert steps_per_epoch(1000, 2, 64) == 7  # 500 rows per rank -> 7 full batches
    assert steps_per_epoch(1001, 2, 64) == 7
    assert steps_per_epoch(100, 2, 64) == 0


def test_seeds_are_distinct_per_epoch_and_rank_and_reproducible():
    seeds = {derive_seed(0, e, r) for e in range(5) for r in range(4)}
    assert len(seeds) == 20
    a = torch.randint(1000, (8,), generator=epoch_generator(3, 1, 0))
    b = torch.randint(1000, (8,), generator=epoch_generator(3, 1, 0))
    c = torch.randint(1000, (8,), generator=epoch_generator(3, 1, 1))
    assert torch.equal(a, b) and not torch.equal(a, c)


def test_load_log_q_indexes_by_item_and_rejects_missing_items(tmp_path):
    from common.catalogue import Catalogue

    specs = [FeatureSpec("item_id", "item", "id", False, "item_index", 6)]
    cat = Catalogue.from_arrow(pa.table({"item_index": pa.array([2, 3, 5], pa.int32())}), specs)
    pop = tmp_path / "stats" / "item_popularity"
    pop.mkdir(parents=True)
    pq.write_table(
        pa.table({"item_index": pa.array([5, 2, 3], pa.int32()), "log_q": [-1.0, -2.0, -3.0]}),
        pop / "part-0.parquet",
    )
    logq = load_log_q(str(tmp_path), {}, cat)
    assert logq.tolist() == [0.0, 0.0, -2.0, -3.0, 0.0, -1.0]
    pq.write_table(pa.table({"item_index": pa.array([5, 2], pa.int32()), "log_q": [-1.0, -2.0]}), pop / "part-0.parquet")
    with pytest.raises(ValueError, match=r"1 of 3 catalogue items have no popularity row \(e.g. item_index \[3\]\)"):
        load_log_q(str(tmp_path), {}, cat)


def test_parquet_uncompressed_bytes_counts_only_the_requested_columns(tmp_path):
    from ray_train.data import parquet_uncompressed_bytes, should_materialize

    table = random_train_table(np.random.default_rng(0), 300)
    pq.write_table(table.slice(0, 100), tmp_path / "a.parquet")
    pq.write_table(table.slice(100), tmp_path / "b.parquet", row_group_size=50)
    one = parquet_uncompressed_bytes(str(tmp_path), ["history"])
    two = parquet_uncompressed_bytes(str(tmp_path), ["item_index"])
    both = parquet_uncompressed_bytes(str(tmp_path), ["history", "item_index"])
    assert one > 0 and two > 0 and both == one + two
    # In the range of the Arrow size: 300 int32 ids take 1200 bytes.
    assert 1200 <= two <= 4 * 1200
    assert should_materialize(100, 400) and not should_materialize(101, 400)


@pytest.mark.cluster
@pytest.mark.parametrize("materialize", [False, True])
def test_equal_batch_counts_per_rank_through_ray_data(tmp_path, ray_cluster, materialize):
    """Two ranks read uneven files through streaming_split(equal=True) + iter_train_batches:
    each gets exactly steps_per_epoch full batches per epoch, and no row twice."""
    import threading

    from ray_train.data import read_train_dataset

    rng = np.random.default_rng(0)
    table = random_train_table(rng, 1037)
    # A unique user_index per row identifies rows after the shuffles.
    table = table.set_column(2, "user_index", pa.array(np.arange(2, 2 + table.num_rows), pa.int32()))
    folder = tmp_path / "train"
    folder.mkdir()
    for i, (a, b) in enumerate([(0, 100), (100, 611), (611, 650), (650, 1037)]):  # uneven files
        pq.write_table(table.slice(a, b - a), folder / f"part-{i}.parquet")

    with driver_of(ray_cluster):
        specs = USER_SPECS
        # Blocks of 8 x 64 rows, block order reshuffled per epoch.
        ds = read_train_dataset(str(tmp_path), {}, specs, seed=0, batch_size=64, materialize=materialize)
        splits = ds.streaming_split(2, equal=True)
        batch, expected = 64, steps_per_epoch(table.num_rows, 2, 64)
        history_of = dict(zip(table.column("user_index").to_pylist(), table.column("history").to_pylist()))
        seen: dict[tuple[int, int], list[int]] = {}
        errors: list[str] = []

        def consume(rank: int) -> None:
            try:
                for epoch in range(2):
                    ids: list[int] = []
                    for tb in iter_train_batches(splits[rank], specs, batch, shuffle_seed(0, epoch, rank)):
                        assert isinstance(tb, TrainBatch) and tb.num_rows == batch
                        rows = tb.user["user_id"].tolist()
                        # The ragged history survived Ray Data + collate + chunk slicing row by row.
                        assert tb.user["history"].tolist() == [history_of[u] for u in rows]
                        ids.extend(rows)
                    seen[(rank, epoch)] = ids
            except Exception as exc:  # surfaced below: a thread's assert would be lost
                errors.append(f"rank {rank}: {exc!r}")

        threads = [threading.Thread(target=consume, args=(r,)) for r in range(2)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=180)
        assert not errors, errors
        assert len(seen) == 4, f"a rank did not finish: {sorted(seen)}"
        for (rank, epoch), ids in seen.items():
            assert len(ids) == expected * batch, (rank, epoch, len(ids))
        for epoch in range(2):
            both = seen[(0, epoch)] + seen[(1, epoch)]
            assert len(set(both)) == len(both)  # a row goes to one rank only
        assert seen[(0, 0)] != seen[(0, 1)]  # a new order every epoch


def test_data_fraction_sample_is_deterministic_nested_and_about_the_fraction():
    from ray_train.data import _KeepFraction, sample_unit

    rng = np.random.default_rng(3)
    n = 20_000
    users, items = rng.integers(2, 500, n), rng.integers(2, 3000, n)
    ts = rng.integers(800_000_000, 900_000_000, n)
    u = sample_unit(users, items, ts)
    assert u.dtype == np.float64 and (u >= 0).all() and (u < 1).all()
    assert np.array_equal(u, sample_unit(users.copy(), items.copy(), ts.copy()))  # no hidden state
    perm = rng.permutation(n)
    assert np.array_equal(u[perm], sample_unit(users[perm], items[perm], ts[perm]))  # row order is irrelevant
    for f in (0.1, 0.5):
        kept = int((u < f).sum())
        assert abs(kept - f * n) < 5 * np.sqrt(n * f * (1 - f)), (f, kept)  # binomial, 5 sigma
    assert ((u < 0.1) <= (u < 0.5)).all()  # the 10% sample is inside the 50% one
    # The same event keeps its decision whatever else is in the batch.
    table = pa.table({"user_index": pa.array(users, pa.int32()), "item_index": pa.array(items, pa.int32()),
                      "timestamp": pa.array(ts, pa.int64()), "history": pa.array([[1]] * n, pa.list_(pa.int32()))})
    out = _KeepFraction(0.5, ["item_index", "history"])(table)
    assert out.column_names == ["item_index", "history"] and out.num_rows == int((u < 0.5).sum())
    assert out.column("item_index").to_numpy().tolist() == items[u < 0.5].tolist()


def test_collate_with_denormalised_positives_slices_and_names_missing_columns():
    """Streamed catalogue: the item columns ``pos__*`` become ``TrainBatch.item`` / ``log_q``,
    and slicing a collated chunk equals collating the slice."""
    from ray_train.data import positive_columns

    specs = USER_SPECS + [FeatureSpec("tags", "item", "multi", True, "f_tags", 9)]
    rng = np.random.default_rng(6)
    table = random_train_table(rng, 23)
    table = table.append_column("pos__f_tags", pa.array(random_lists(rng, 23, 3), pa.list_(pa.int32())))
    table = table.append_column("pos__log_q", pa.array(-rng.random(23), pa.float32()))
    assert positive_columns(specs) == ["pos__f_tags", "pos__log_q"]
    whole = collate_table(table, specs, positives=True)
    assert whole.item["item_id"].tolist() == table.column("item_index").to_pylist()
    assert whole.item["tags"].tolist() == table.column("pos__f_tags").to_pylist()
    assert whole.log_q.dtype == torch.float32
    assert whole.log_q.tolist() == table.column("pos__log_q").to_pylist()
    assert collate_table(table, specs).item is None  # the replicated path's batches are unchanged
    for start, length in [(0, 10), (10, 13), (22, 1)]:
        part, ref = whole.slice(start, length), collate_table(table.slice(start, length), specs, positives=True)
        assert part.item["tags"].tolist() == ref.item["tags"].tolist()
        assert part.item["tags"].offsets.tolist() == ref.item["tags"].offsets.tolist()
        assert part.log_q.tolist() == ref.log_q.tolist()
    moved = whole.to("cpu")
    assert moved.item["tags"].tolist() == whole.item["tags"].tolist() and moved.log_q is not None
    with pytest.raises(ValueError, match=r"lacks column\(s\) \['pos__log_q'\]"):
        collate_table(table.drop_columns(["pos__log_q"]), specs, positives=True)
