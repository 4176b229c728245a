import pyarrow as pa
import pytest
import torch

from common.catalogue import Catalogue
from common.features import FeatureSpec

SPECS = [
    FeatureSpec("item_id", "item", "id", False, "item_index", 6),
    FeatureSpec("genre", "item", "categorical", False, "f_genre", 5),
    FeatureSpec("tags", "item", "multi", True, "f_tags", 9),
    # A user-side spec must be ignored by the catalogue.
    FeatureSpec("user_id", "user", "id", False, "user_index", 4),
]


def items_table() -> pa.Table:
    # Rows deliberately out of item_index order; item 4 has no tags.
    return pa.table(
        {
            "item_index": pa.array([5, 2, 4, 3], pa.int32()),
            "item_id": pa.array(["e", "b", "d", "c"]),
            "f_genre": pa.array([4, 2, 3, 1], pa.int32()),
            "f_tags": pa.array([[8], [2, 3], [], [4, 5, 6]], pa.list_(pa.int32())),
        }
    )


def test_from_arrow_and_lookup():
    cat = Catalogue.from_arrow(items_table(), SPECS)
    assert cat.num_rows == 6
    assert cat.num_items == 4
    assert cat.item_indices.tolist() == [2, 3, 4, 5]
    assert set(cat.features) == {"item_id", "genre", "tags"}

    got = cat.lookup(torch.tensor([5, 2, 4, 0, 2]))
    assert got["item_id"].tolist() == [5, 2, 4, 0, 2]
    assert got["item_id"].dtype == torch.int64
    assert got["genre"].tolist() == [4, 2, 3, 0, 2]
    # Row 0 is a dummy row: MASK for single-valued, empty for multi-valued features.
    assert got["tags"].tolist() == [[8], [2, 3], [], [], [2, 3]]
    assert cat.lookup(torch.tensor([1]))["genre"].tolist() == [0]


def test_from_arrow_chunked_columns():
    t = items_table()
    chunked = pa.concat_tables([t.slice(0, 2), t.slice(2, 2)])
    assert chunked.column("f_tags").num_chunks == 2
    cat = Catalogue.from_arrow(chunked, SPECS)
    assert cat.lookup(torch.tensor([3, 4, 5]))["tags"].tolist() == [[4, 5, 6], [], [8]]


def test_from_arrow_errors_name_the_problem():
    t = items_table()
    with pytest.raises(ValueError, match="f_genre"):
        Catalogue.from_arrow(t.drop_columns(["f_genre"]), SPECS)
    dup = t.set_column(0, "item_index", pa.array([5, 2, 2, 3], pa.int32()))
    with pytest.raises(ValueError, match="unique"):
        Catalogue.from_arrow(dup, SPECS)
    low = t.set_column(0, "item_index", pa.array([5, 1, 4, 3], pa.int32()))
    with pytest.raises(ValueError, match="reserved"):
        Catalogue.from_arrow(low, SPECS)
    with pytest.raises(IndexError, match="rows 0..5"):
        Catalogue.from_arrow(t, SPECS).lookup(torch.tensor([6]))


def big_catalogue(n: int) -> Catalogue:
    return Catalogue.from_arrow(
        pa.table(
            {
                "item_index": pa.array(range(2, n + 2), pa.int32()),
                "f_genre": pa.array([2] * n, pa.int32()),
                "f_tags": pa.array([[2]] * n, pa.list_(pa.int32())),
            }
        ),
        SPECS,
    )


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_sample_uniform_covers_catalogue_and_is_uniform(seed):
    n_items, draws = 40, 40_000
    cat = big_catalogue(n_items)
    got = cat.sample_uniform(draws, torch.Generator().manual_seed(seed))
    assert got.shape == (draws,) and got.dtype == torch.int64
    assert int(got.min()) >= 2 and int(got.max()) <= n_items + 1  # never the dummy rows
    counts = torch.bincount(got - 2, minlength=n_items).double()
    # The catalogue knows no clicks, so every item (clicked or not) must be drawn.
    assert bool((counts > 0).all())
    expected = draws / n_items
    chi2 = float(((counts - expected) ** 2 / expected).sum())
    df = n_items - 1
    # chi2 has mean df and sd sqrt(2 df); 6 sd is far beyond chance but catches any real skew.
    assert chi2 < df + 6 * (2 * df) ** 0.5


def test_sample_uniform_is_seeded():
    cat = big_catalogue(30)
    a = cat.sample_uniform(100, torch.Generator().manual_seed(5))
    b = cat.sample_uniform(100, torch.Generator().manual_seed(5))
    c = cat.sample_uniform(100, torch.Generator().manual_seed(6))
    assert torch.equal(a, b)
    assert not torch.equal(a, c)
