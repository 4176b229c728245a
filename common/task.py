"""The training objective: two towers, the main batch-softmax task and the SSL item task.

``L = L_main + ssl.alpha * L_ssl`` (Yao et al. 2021, eq. 4), where

* ``L_main`` is the batch softmax of each user against the positive items of the batch (optionally
  gathered from all workers), with logQ correction and removal of accidental hits;
* ``L_ssl`` depends on ``ssl.method``: ``rfm`` / ``rfm_no_compl`` / ``cfm``: InfoNCE between two
  augmented views of a separate item batch (drawn uniformly from the catalogue by the caller); the
  views only pass through the item tower, so the user tower's own parameters get no gradient from
  it (the shared ``item_id`` table, used by the user's ``history``, does, since the item tower owns
  it). ``so``: spread-out regulariser on the main batch's item embeddings. ``fd``: no extra loss,
  feature dropout on the positive items' features instead (training mode only). ``none``: 0.

Global negatives. With ``gather`` given (``train.global_negatives``), the candidates are every
worker's positives: ``gather(x [B, ...]) -> [world * B, ...]`` concatenates in rank order, and
this worker's positives sit at rows ``rank * B + arange(B)``. ``gather`` is called on the item
embeddings, then on ``log_q`` (when logQ correction is on) and then on the positive ids (when
accidental hits are removed). Every worker must hold the same ``B``. For the gradient to equal
the single-worker gradient of the ``world * B`` batch, ``gather``'s backward must return to each
worker the SUM over workers of the gradient w.r.t. its slice (what
``torch.distributed.nn.functional.all_gather`` does); with that, and DDP's averaging of gradients,
the per-worker mean reduction of ``common.losses`` reproduces the large-batch gradient exactly. A
gather whose remote slices are constants (plain ``dist.all_gather``) drops the gradient that other
workers' queries send to this worker's items.
"""

from __future__ import annotations

import logging
from typing import Callable, Mapping

import torch
from torch import Tensor, nn

from common.augment import feature_dropout, make_views
from common.config import Config
from common.features import FeatureSpec, side
from common.losses import batch_softmax_loss, info_nce_loss, spread_out_loss
from common.ragged import FeatureBatch, batch_size, concat_batches
from common.towers import build_towers

log = logging.getLogger(__name__)

Gather = Callable[[Tensor], Tensor]


class TwoTowerTask(nn.Module):
    def __init__(
        self,
        specs: list[FeatureSpec],
        cfg: Config,
        mutual_info: Mapping[frozenset, float],
    ) -> None:
        super().__init__()
        self.specs = list(specs)
        self.item_specs = side(specs, "item")
        self.user_specs = side(specs, "user")
        self.cfg = cfg
        self.mutual_info = dict(mutual_info)
        self.item_tower, self.user_tower = build_towers(self.specs, cfg.model)
        if cfg.ssl.method == "cfm":
            names = [s.name for s in self.item_specs]
            missing = [
                (a, b) for i, a in enumerate(names) for b in names[i + 1 :] if frozenset((a, b)) not in self.mutual_info
            ]
            if len(missing) == len(names) * (len(names) - 1) // 2:
                raise ValueError(
                    f"TwoTowerTask: ssl.method is cfm but the mutual-information table holds no pair "
                    f"of the item features {names} ({len(self.mutual_info)} pairs given); pass "
                    f"stats/mutual_info keyed by feature names (common.augment.mutual_info_from_records)"
                )
            if missing:
                log.warning("cfm: no mutual information for pairs %s; they count as MI 0", missing)

    def user_embeddings(self, user_feats: FeatureBatch) -> Tensor:
        """``[B, D]`` unit-norm user embeddings."""
        return self.user_tower(user_feats)

    def item_embeddings(self, item_feats: FeatureBatch) -> Tensor:
        """``[B, D]`` unit-norm item embeddings (no augmentation)."""
        return self.item_tower(item_feats)

    def forward(
        self,
        user_feats: FeatureBatch,
        pos_item_feats: FeatureBatch,
        pos_item_ids: Tensor,
        log_q: Tensor | None,
        ssl_item_feats: FeatureBatch | None,
        generator: torch.Generator,
        gather: Gather | None = None,
        rank: int = 0,
        weights: Tensor | None = None,
    ) -> dict[str, Tensor]:
        """Scalar losses ``{"loss", "main", "ssl"}`` (``ssl`` is 0 when the method has none).

        ``user_feats``/``pos_item_feats``: ``B`` rows; ``pos_item_ids [B]`` item_index of each
        positive; ``log_q [B]`` log sampling probability of each positive (required when
        ``train.logq_correction``); ``ssl_item_feats``: the SSL item batch (required for rfm,
        rfm_no_compl, cfm; ignored otherwise); ``weights [B]`` per-example weights.
        """
        train_cfg, ssl_cfg = self.cfg.train, self.cfg.ssl
        b = batch_size(user_feats)
        if batch_size(pos_item_feats) != b or pos_item_ids.shape != (b,):
            raise ValueError(
                f"TwoTowerTask: {b} users but {batch_size(pos_item_feats)} positive items and "
                f"pos_item_ids of shape {tuple(pos_item_ids.shape)}; one positive per user"
            )
        if train_cfg.logq_correction and log_q is None:
            raise ValueError(
                "TwoTowerTask: train.logq_correction is on but log_q is None; pass the positives' "
                "log_q from stats/item_popularity or set train.logq_correction: false"
            )

        user_emb = self.user_tower(user_feats)
        if ssl_cfg.method == "fd" and self.training:
            pos_item_feats = feature_dropout(pos_item_feats, self.item_specs, ssl_cfg.fd_rate, generator)
        item_emb = self.item_tower(pos_item_feats)

        lq = log_q if train_cfg.logq_correction else None
        ids = pos_item_ids if train_cfg.remove_accidental_hits else None
        if gather is None:
            candidates, labels = item_emb, torch.arange(b, device=item_emb.device)
            cand_lq, cand_ids = lq, ids
        else:
            candidates = gather(item_emb)
            world = candidates.shape[0] // b
            if candidates.shape[0] != world * b or not 0 <= rank < world:
                raise ValueError(
                    f"TwoTowerTask: gather returned {candidates.shape[0]} rows for a local batch of "
                    f"{b} at rank {rank}; every worker must hold the same batch size"
                )
            labels = rank * b + torch.arange(b, device=item_emb.device)
            cand_lq = gather(lq) if lq is not None else None
            cand_ids = gather(ids) if ids is not None else None
        main = batch_softmax_loss(
            user_emb,
            candidates,
            labels,
            train_cfg.tau,
            log_q=cand_lq,
            query_item_ids=ids,
            candidate_item_ids=cand_ids,
            weights=weights,
        )

        if ssl_cfg.uses_contrastive_task:
            if ssl_item_feats is None:
                raise ValueError(
                    f"TwoTowerTask: ssl.method {ssl_cfg.method!r} needs an SSL item batch "
                    f"(ssl_item_feats, e.g. Catalogue.lookup(Catalogue.sample_uniform(ssl.batch_size)))"
                )
            v1, v2 = make_views(ssl_item_feats, self.item_specs, ssl_cfg, self.mutual_info, generator)
            n = batch_size(v1)
            # One item-tower call for both views: one pass over the tables and the MLP.
            z = self.item_tower(concat_batches(v1, v2))
            ssl = info_nce_loss(z[:n], z[n:], torch.arange(n, device=z.device), ssl_cfg.tau)
        elif ssl_cfg.method == "so":
            ssl = spread_out_loss(item_emb)
        else:
            ssl = main.new_zeros(())
        return {"loss": main + ssl_cfg.alpha * ssl, "main": main, "ssl": ssl}
