"""Feature augmentations of the self-supervised item task (Yao et al. 2021, section 3.2) and of the
``fd`` baseline.

Every function is pure: it reads a ``FeatureBatch`` and a ``torch.Generator`` and returns new
tensors, never writing into its inputs. The same generator state gives the same output. Random
numbers are drawn on the generator's device and moved to the data's device, so a CPU generator
works with CUDA batches.

Masks are sets of feature names, drawn once per batch (all rows of a view mask the same features):

* ``rfm`` (random feature masking): a random permutation of the ``k`` item features (``item_id``
  included) is cut in two; view 1 masks the first ``floor(k/2)``, view 2 the other ``ceil(k/2)``.
  The two masked sets are complementary: each feature is kept in exactly one view, so the views
  share no input and the model must relate different features of the same item.
* ``cfm`` (correlated feature masking): a seed feature is drawn uniformly; view 1 masks the seed
  plus the ``m - 1`` other features with the highest mutual information with the seed, where
  ``m = max(1, floor(k/2))``, so the masked set has ``floor(k/2)`` features like rfm's first view
  (the issue's wording "seed plus its top floor(k/2) features" would mask ``floor(k/2) + 1``, more
  than half; the paper's Algorithm 1 grows the set from the seed until it holds half the features,
  which is what is done here). View 2 masks the complement. MI ties are broken by the order of
  ``feature_names``; pairs absent from the MI table count as MI 0. Masking correlated features
  together removes the shortcut of predicting a masked feature from a kept correlated one.
* ``rfm_no_compl``: two independent masks; each feature is masked with probability 1/2 in each
  view (the paper's ablation without complementarity).

A masked single-valued feature becomes the default index 0 in every row; a masked multi-valued
feature becomes one value 0 per row. ``multi_value_dropout`` then drops each value of each
multi-valued feature with probability ``rate``; a row that loses all its values gets the single
value 0 (rows that were empty stay empty).
"""

from __future__ import annotations

from typing import Iterable, Mapping, Sequence

import torch
from torch import Tensor

from common.config import SSLConfig
from common.features import MASK_INDEX, FeatureSpec
from common.ragged import FeatureBatch, Ragged, batch_size

MutualInfo = Mapping[frozenset, float]


# ---------------------------------------------------------------------------------------------
# Masks: which features each view hides
# ---------------------------------------------------------------------------------------------


def _check_names(feature_names: Sequence[str], who: str) -> list[str]:
    names = list(feature_names)
    if not names:
        raise ValueError(f"{who}: no feature names to mask")
    if len(set(names)) != len(names):
        raise ValueError(f"{who}: repeated feature names {names}")
    return names


def rfm_masks(feature_names: Sequence[str], generator: torch.Generator) -> tuple[frozenset[str], frozenset[str]]:
    """Complementary random split: sizes ``floor(k/2)`` (view 1) and ``ceil(k/2)`` (view 2)."""
    names = _check_names(feature_names, "rfm_masks")
    perm = torch.randperm(len(names), generator=generator, device=generator.device).tolist()
    half = len(names) // 2
    return frozenset(names[i] for i in perm[:half]), frozenset(names[i] for i in perm[half:])


def rfm_no_compl_masks(
    feature_names: Sequence[str], generator: torch.Generator
) -> tuple[frozenset[str], frozenset[str]]:
    """Two independent masks, each feature masked with probability 1/2 in each view."""
    names = _check_names(feature_names, "rfm_no_compl_masks")
    draws = torch.rand(2, len(names), generator=generator, device=generator.device) < 0.5
    return tuple(frozenset(n for n, m in zip(names, row.tolist()) if m) for row in draws)  # type: ignore[return-value]


def cfm_masks(
    feature_names: Sequence[str], mi: MutualInfo, generator: torch.Generator
) -> tuple[frozenset[str], frozenset[str]]:
    """View 1 masks a uniformly drawn seed plus its ``max(1, floor(k/2)) - 1`` highest-MI partners;
    view 2 masks the complement. ``mi`` maps ``frozenset({a, b})`` to the mutual information of
    features ``a`` and ``b`` (any units; only the ranking matters)."""
    names = _check_names(feature_names, "cfm_masks")
    if len(names) > 1 and not any(frozenset((a, b)) in mi for a in names for b in names if a != b):
        raise ValueError(
            f"cfm_masks: the mutual-information table holds no pair of the features {names} "
            f"(it has {len(mi)} pairs, e.g. {[sorted(p) for p in list(mi)[:3]]}); load it from "
            f"stats/mutual_info with feature names (not column names) as keys"
        )
    seed_pos = int(torch.randint(len(names), (1,), generator=generator, device=generator.device))
    seed = names[seed_pos]
    size = max(1, len(names) // 2)
    partners = [n for n in names if n != seed]
    # Python's sort is stable, so equal MI keeps feature_names order.
    partners.sort(key=lambda n: -float(mi.get(frozenset((seed, n)), 0.0)))
    masked = frozenset([seed, *partners[: size - 1]])
    return masked, frozenset(names) - masked


# ---------------------------------------------------------------------------------------------
# Applying masks and dropout
# ---------------------------------------------------------------------------------------------


def _spec_index(feats: FeatureBatch, specs: Iterable[FeatureSpec], who: str) -> list[FeatureSpec]:
    """The specs of the features present in ``feats``, in spec order; type-checked."""
    out = []
    for spec in specs:
        if spec.name not in feats:
            continue
        x = feats[spec.name]
        if spec.multi != isinstance(x, Ragged):
            raise TypeError(
                f"{who}: feature {spec.name!r} is {'multi' if spec.multi else 'single'}-valued in "
                f"its spec but arrived as {type(x).__name__}"
            )
        out.append(spec)
    return out


def _uniform(n: int, generator: torch.Generator, device: torch.device) -> Tensor:
    return torch.rand(n, generator=generator, device=generator.device).to(device)


def _rebuild(r: Ragged, keep: Tensor, fill_rows: Tensor) -> Ragged:
    """Keep the values where ``keep [nnz]``; rows where ``fill_rows [batch]`` get one extra value 0
    (only used for rows that keep nothing, so order within rows is preserved)."""
    b = r.num_rows
    row_of_value = r.row_ids()
    kept_rows = row_of_value[keep]
    fill = torch.nonzero(fill_rows, as_tuple=False).flatten()
    rows = torch.cat([kept_rows, fill])
    values = torch.cat([r.values[keep], torch.full_like(fill, MASK_INDEX)])
    # Stable sort by row: kept values keep their order inside each row.
    rows, order = torch.sort(rows, stable=True)
    lengths = torch.bincount(rows, minlength=b)
    return Ragged.from_lengths(values[order], lengths)


def _masked_like(x: Tensor | Ragged) -> Tensor | Ragged:
    if isinstance(x, Ragged):
        b = x.num_rows
        dev = x.offsets.device
        return Ragged(torch.full((b,), MASK_INDEX, dtype=torch.int64, device=dev), torch.arange(b, device=dev))
    return torch.full_like(x, MASK_INDEX)


def apply_mask(feats: FeatureBatch, specs: Iterable[FeatureSpec], masked_names: Iterable[str]) -> FeatureBatch:
    """A copy of ``feats`` where every feature in ``masked_names`` holds the default value 0 in all
    rows (single-valued: ``0``; multi-valued: the one-element row ``[0]``)."""
    masked = set(masked_names)
    unknown = masked - set(feats)
    if unknown:
        raise KeyError(f"apply_mask: masked feature(s) {sorted(unknown)} are not in the batch ({sorted(feats)})")
    _spec_index(feats, specs, "apply_mask")
    return {name: (_masked_like(x) if name in masked else x) for name, x in feats.items()}


def multi_value_dropout(
    feats: FeatureBatch, specs: Iterable[FeatureSpec], rate: float, generator: torch.Generator
) -> FeatureBatch:
    """Drop each value of each multi-valued feature independently with probability ``rate``; a
    non-empty row left with no value gets ``[0]``. Single-valued features pass through."""
    if not 0.0 <= rate < 1.0:
        raise ValueError(f"multi_value_dropout: rate must be in [0, 1), got {rate}")
    out = dict(feats)
    for spec in _spec_index(feats, specs, "multi_value_dropout"):
        if not spec.multi:
            continue
        r: Ragged = feats[spec.name]  # type: ignore[assignment]
        keep = _uniform(r.values.numel(), generator, r.values.device) >= rate
        kept_per_row = torch.bincount(r.row_ids()[keep], minlength=r.num_rows)
        out[spec.name] = _rebuild(r, keep, (r.lengths() > 0) & (kept_per_row == 0))
    return out


def feature_dropout(
    feats: FeatureBatch, specs: Iterable[FeatureSpec], rate: float, generator: torch.Generator
) -> FeatureBatch:
    """The ``fd`` baseline: each feature of each row is masked (set to the default 0, or ``[0]`` for
    a multi-valued feature) independently with probability ``rate``."""
    if not 0.0 <= rate < 1.0:
        raise ValueError(f"feature_dropout: rate must be in [0, 1), got {rate}")
    out = dict(feats)
    for spec in _spec_index(feats, specs, "feature_dropout"):
        x = feats[spec.name]
        if isinstance(x, Ragged):
            drop_row = _uniform(x.num_rows, generator, x.offsets.device) < rate
            out[spec.name] = _rebuild(x, ~drop_row[x.row_ids()], drop_row)
        else:
            drop_row = _uniform(x.shape[0], generator, x.device) < rate
            out[spec.name] = torch.where(drop_row, torch.full_like(x, MASK_INDEX), x)
    return out


def make_views(
    feats: FeatureBatch,
    specs: Iterable[FeatureSpec],
    ssl_cfg: SSLConfig,
    mi: MutualInfo,
    generator: torch.Generator,
) -> tuple[FeatureBatch, FeatureBatch]:
    """Two augmented views of an item batch for the contrastive task (``ssl.method`` rfm,
    rfm_no_compl or cfm): masks over all item features of ``specs`` (``item_id`` included), then,
    when ``ssl.multi_value_dropout``, multi-valued dropout at ``ssl.dropout_rate`` on each view."""
    item_specs = [s for s in specs if s.side == "item"]
    absent = [s.name for s in item_specs if s.name not in feats]
    if absent:
        raise KeyError(f"make_views: the item batch lacks feature(s) {absent}; it holds {sorted(feats)}")
    batch_size(feats)
    names = [s.name for s in item_specs]
    if ssl_cfg.method == "rfm":
        m1, m2 = rfm_masks(names, generator)
    elif ssl_cfg.method == "rfm_no_compl":
        m1, m2 = rfm_no_compl_masks(names, generator)
    elif ssl_cfg.method == "cfm":
        m1, m2 = cfm_masks(names, mi, generator)
    else:
        raise ValueError(
            f"make_views: ssl.method {ssl_cfg.method!r} has no contrastive task; views exist for "
            f"rfm, rfm_no_compl and cfm"
        )
    views = []
    for masked in (m1, m2):
        v = apply_mask(feats, item_specs, masked)
        if ssl_cfg.multi_value_dropout and ssl_cfg.dropout_rate > 0:
            v = multi_value_dropout(v, item_specs, ssl_cfg.dropout_rate, generator)
        views.append(v)
    return views[0], views[1]


def mutual_info_from_records(records: Iterable[Mapping[str, object]]) -> dict[frozenset[str], float]:
    """``stats/mutual_info`` rows (or ``model/mutual_info.json``: ``{feature_a, feature_b, mi}``)
    as the ``frozenset({a, b}) -> mi`` table ``cfm_masks`` reads."""
    out: dict[frozenset[str], float] = {}
    for rec in records:
        try:
            a, b, v = str(rec["feature_a"]), str(rec["feature_b"]), float(rec["mi"])  # type: ignore[arg-type]
        except KeyError as exc:
            raise KeyError(
                f"mutual_info_from_records: a record lacks {exc}; expected keys feature_a, feature_b, mi, got {sorted(rec)}"
            ) from None
        if a != b:
            out[frozenset((a, b))] = v
    return out
