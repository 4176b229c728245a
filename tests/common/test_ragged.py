import random

import pytest
import torch

from common.ragged import Ragged, batch_size, concat_batches, concat_rows, select_rows


def random_rows(rng: random.Random, n_rows: int) -> list[list[int]]:
    # Empty rows on purpose: they are where offset arithmetic goes wrong.
    return [[rng.randrange(0, 50) for _ in range(rng.choice([0, 0, 1, 2, 5]))] for _ in range(n_rows)]


def test_from_lengths_offsets_and_lengths():
    r = Ragged.from_lengths(torch.tensor([7, 8, 9, 10]), torch.tensor([2, 0, 1, 1]))
    assert r.offsets.tolist() == [0, 2, 2, 3]
    assert r.lengths().tolist() == [2, 0, 1, 1]
    assert r.tolist() == [[7, 8], [], [9], [10]]
    assert r.values.dtype == torch.int64 and r.offsets.dtype == torch.int64
    assert r.row_ids().tolist() == [0, 0, 2, 3]


def test_from_lengths_rejects_mismatch():
    with pytest.raises(ValueError, match="sum to 3 but 2 values"):
        Ragged.from_lengths(torch.tensor([1, 2]), torch.tensor([1, 2]))


@pytest.mark.parametrize("seed", range(6))
def test_index_select_matches_python(seed):
    rng = random.Random(seed)
    rows = random_rows(rng, rng.randrange(1, 30))
    r = Ragged.from_lists(rows)
    assert r.tolist() == rows
    picks = [rng.randrange(len(rows)) for _ in range(rng.randrange(0, 40))]  # repeats allowed
    got = r.index_select(torch.tensor(picks, dtype=torch.int64))
    assert got.tolist() == [rows[p] for p in picks]
    # Offsets must follow the EmbeddingBag convention: row starts.
    expected_offsets, acc = [], 0
    for p in picks:
        expected_offsets.append(acc)
        acc += len(rows[p])
    assert got.offsets.tolist() == expected_offsets


def test_index_select_out_of_range():
    r = Ragged.from_lists([[1], [2]])
    with pytest.raises(IndexError, match="2 rows"):
        r.index_select(torch.tensor([0, 2]))


@pytest.mark.parametrize("seed", range(4))
def test_concat_rows_and_batches(seed):
    rng = random.Random(seed)
    a_rows, b_rows = random_rows(rng, 4), random_rows(rng, 3)
    joined = concat_rows(Ragged.from_lists(a_rows), Ragged.from_lists(b_rows))
    assert joined.tolist() == a_rows + b_rows

    a = {"x": torch.tensor([1, 2, 3, 4]), "m": Ragged.from_lists(a_rows)}
    b = {"x": torch.tensor([5, 6, 7]), "m": Ragged.from_lists(b_rows)}
    ab = concat_batches(a, b)
    assert ab["x"].tolist() == [1, 2, 3, 4, 5, 6, 7]
    assert ab["m"].tolist() == a_rows + b_rows
    assert batch_size(ab) == 7


def test_concat_batches_rejects_different_features():
    with pytest.raises(ValueError, match="different features"):
        concat_batches({"x": torch.tensor([1])}, {"y": torch.tensor([1])})


def test_select_rows_and_batch_size():
    feats = {"x": torch.tensor([10, 11, 12]), "m": Ragged.from_lists([[1], [], [2, 3]])}
    sel = select_rows(feats, torch.tensor([2, 0]))
    assert sel["x"].tolist() == [12, 10]
    assert sel["m"].tolist() == [[2, 3], [1]]
    with pytest.raises(ValueError, match="disagree"):
        batch_size({"x": torch.tensor([1, 2]), "m": Ragged.from_lists([[1]])})
