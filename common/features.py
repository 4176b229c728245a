"""The encoded-feature contract between the Spark preparation and the trainer.

Every feature, whatever its raw form, is encoded as vocabulary indices:

* index ``MASK_INDEX`` (0) is reserved for the "masked / default" embedding that SSL views use,
* index ``OOV_INDEX`` (1) is out-of-vocabulary (values under the min count, unseen values),
* real values start at ``FIRST_INDEX`` (2).

Single-valued features (``categorical`` and ``bucketized``) become an ``int32`` column; multi-valued
features become a ``list<int32>`` column. ``FeatureSpec`` records, per feature, which column of
which table holds it and how large its embedding table must be. The Spark jobs write the specs to
``manifest.json``; the trainer reads them back with ``specs_from_manifest``.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any, Iterable, Literal, Optional

MASK_INDEX = 0
OOV_INDEX = 1
FIRST_INDEX = 2

ITEM_ID = "item_id"
USER_ID = "user_id"
HISTORY = "history"


def feature_column(name: str) -> str:
    """Column that holds an encoded feature in the prepared tables."""
    if name == ITEM_ID:
        return "item_index"
    if name == USER_ID:
        return "user_index"
    if name == HISTORY:
        return "history"
    return f"f_{name}"


@dataclass(frozen=True)
class FeatureSpec:
    name: str
    side: Literal["item", "user"]
    # How the raw value was declared: ids are categorical; history is the user's past items.
    source: Literal["id", "categorical", "multi", "bucketized", "history"]
    # Whether the encoded column is a list (multi-valued) or a scalar.
    multi: bool
    column: str
    # Rows of the embedding table, reserved indices 0 and 1 included.
    vocab_size: int
    # The history feature shares the item id embedding table instead of owning one.
    shares_embedding_with: Optional[str] = None

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @staticmethod
    def from_json(d: dict[str, Any]) -> "FeatureSpec":
        return FeatureSpec(**d)


def specs_from_manifest(manifest: dict[str, Any]) -> list[FeatureSpec]:
    try:
        raw = manifest["features"]
    except KeyError:
        raise ValueError(
            "manifest.json has no 'features' section; rerun `python -m spark_jobs.prepare` "
            "to produce a complete prepared folder"
        ) from None
    return [FeatureSpec.from_json(d) for d in raw]


def side(specs: Iterable[FeatureSpec], which: Literal["item", "user"]) -> list[FeatureSpec]:
    return [s for s in specs if s.side == which]
