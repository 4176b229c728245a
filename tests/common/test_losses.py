import math

import pytest
import torch
import torch.nn.functional as F

from common.losses import batch_softmax_loss, info_nce_loss, spread_out_loss

# The 2 x 3 example used throughout: unit vectors, so dot products are cosines.
#   q1 = (1, 0), q2 = (0, 1); c1 = (1, 0), c2 = (0, 1), c3 = (0.6, 0.8)
#   q1 . c = [1, 0, 0.6];  q2 . c = [0, 1, 0.8]
# With tau = 0.5 the logits are q1: [2, 0, 1.2], q2: [0, 2, 1.6]. Labels: q1 -> c1, q2 -> c2.
Q = torch.tensor([[1.0, 0.0], [0.0, 1.0]], dtype=torch.float64)
C = torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.6, 0.8]], dtype=torch.float64)
LABELS = torch.tensor([0, 1])
TAU = 0.5

L1 = -2 + math.log(math.exp(2) + math.exp(0) + math.exp(1.2))
L2 = -2 + math.log(math.exp(0) + math.exp(2) + math.exp(1.6))


def test_plain_batch_softmax_by_hand():
    got = batch_softmax_loss(Q, C, LABELS, TAU)
    assert got.item() == pytest.approx((L1 + L2) / 2, rel=1e-12)


def test_logq_correction_by_hand():
    # q = [0.5, 0.25, 0.25]; every logit, the positive's too, loses log q_j:
    #   q1: [2 - ln .5, 0 - ln .25, 1.2 - ln .25];  q2: [0 - ln .5, 2 - ln .25, 1.6 - ln .25]
    lq = [math.log(0.5), math.log(0.25), math.log(0.25)]
    r1 = [2 - lq[0], 0 - lq[1], 1.2 - lq[2]]
    r2 = [0 - lq[0], 2 - lq[1], 1.6 - lq[2]]
    l1 = -r1[0] + math.log(sum(math.exp(v) for v in r1))
    l2 = -r2[1] + math.log(sum(math.exp(v) for v in r2))
    got = batch_softmax_loss(Q, C, LABELS, TAU, log_q=torch.tensor(lq, dtype=torch.float64))
    assert got.item() == pytest.approx((l1 + l2) / 2, rel=1e-12)
    # The correction changes the loss: the test would notice it being skipped.
    assert abs(got.item() - (L1 + L2) / 2) > 0.1


def test_accidental_hits_removed_by_hand():
    # Candidate ids [7, 8, 7]: c3 is the same item as q1's positive c1, so it leaves q1's softmax:
    #   l1 = -2 + ln(e^2 + e^0); q2's positive is item 8, which appears once, so l2 is unchanged.
    l1 = -2 + math.log(math.exp(2) + math.exp(0))
    got = batch_softmax_loss(
        Q, C, LABELS, TAU, query_item_ids=torch.tensor([7, 8]), candidate_item_ids=torch.tensor([7, 8, 7])
    )
    assert got.item() == pytest.approx((l1 + L2) / 2, rel=1e-12)
    # The positive itself is never removed, even though its id matches.
    same = batch_softmax_loss(
        Q, C, LABELS, TAU, query_item_ids=torch.tensor([7, 8]), candidate_item_ids=torch.tensor([7, 8, 9])
    )
    assert same.item() == pytest.approx((L1 + L2) / 2, rel=1e-12)


def test_logq_and_accidental_hits_together_by_hand():
    lq = [math.log(0.5), math.log(0.25), math.log(0.25)]
    # q1 keeps c1, c2 (c3 removed); q2 keeps all three.
    r1 = [2 - lq[0], 0 - lq[1]]
    r2 = [0 - lq[0], 2 - lq[1], 1.6 - lq[2]]
    l1 = -r1[0] + math.log(sum(math.exp(v) for v in r1))
    l2 = -r2[1] + math.log(sum(math.exp(v) for v in r2))
    got = batch_softmax_loss(
        Q,
        C,
        LABELS,
        TAU,
        log_q=torch.tensor(lq, dtype=torch.float64),
        query_item_ids=torch.tensor([7, 8]),
        candidate_item_ids=torch.tensor([7, 8, 7]),
    )
    assert got.item() == pytest.approx((l1 + l2) / 2, rel=1e-12)


def test_weights_by_hand():
    # mean_i w_i l_i, not renormalised by sum(w): (2 * L1 + 0.5 * L2) / 2.
    got = batch_softmax_loss(Q, C, LABELS, TAU, weights=torch.tensor([2.0, 0.5], dtype=torch.float64))
    assert got.item() == pytest.approx((2 * L1 + 0.5 * L2) / 2, rel=1e-12)
    ones = batch_softmax_loss(Q, C, LABELS, TAU, weights=torch.ones(2, dtype=torch.float64))
    assert ones.item() == pytest.approx((L1 + L2) / 2, rel=1e-12)


def test_info_nce_by_hand():
    # tau = 0.25: logits q1: [4, 0, 2.4], q2: [0, 4, 3.2]
    l1 = -4 + math.log(math.exp(4) + math.exp(0) + math.exp(2.4))
    l2 = -4 + math.log(math.exp(0) + math.exp(4) + math.exp(3.2))
    got = info_nce_loss(Q, C, LABELS, 0.25)
    assert got.item() == pytest.approx((l1 + l2) / 2, rel=1e-12)


def test_spread_out_by_hand():
    # Pairwise dots: e1.e2 = 0, e1.e3 = 0.6, e2.e3 = 0.8; squares 0, .36, .64, each ordered pair
    # counted twice: 2 * (0 + .36 + .64) / (3 * 2) = 1/3.
    assert spread_out_loss(C).item() == pytest.approx(1 / 3, rel=1e-12)
    assert spread_out_loss(C[:1]).item() == 0.0


@pytest.mark.parametrize("seed", range(5))
def test_agrees_with_cross_entropy_on_random_inputs(seed):
    g = torch.Generator().manual_seed(seed)
    b, n, d = 6, 9, 4
    q = F.normalize(torch.randn(b, d, generator=g, dtype=torch.float64), dim=-1)
    c = F.normalize(torch.randn(n, d, generator=g, dtype=torch.float64), dim=-1)
    labels = torch.randperm(n, generator=g)[:b]
    lq = torch.log(torch.rand(n, generator=g, dtype=torch.float64))
    ids = torch.randint(0, 4, (n,), generator=g)  # few ids: many accidental hits
    tau = 0.1
    # Reference: explicit logits with removed entries at -inf, then F.cross_entropy.
    ref_logits = q @ c.T / tau - lq
    for i in range(b):
        for j in range(n):
            if j != labels[i] and ids[j] == ids[labels[i]]:
                ref_logits[i, j] = float("-inf")
    ref = F.cross_entropy(ref_logits, labels)
    got = batch_softmax_loss(q, c, labels, tau, log_q=lq, query_item_ids=ids[labels], candidate_item_ids=ids)
    assert got.item() == pytest.approx(ref.item(), rel=1e-10)
    assert info_nce_loss(q, c, labels, tau).item() == pytest.approx(
        F.cross_entropy(q @ c.T / tau, labels).item(), rel=1e-10
    )


def test_low_precision_inputs_give_float32_loss():
    got = batch_softmax_loss(Q.bfloat16(), C.bfloat16(), LABELS, TAU)
    assert got.dtype == torch.float32
    assert got.item() == pytest.approx((L1 + L2) / 2, rel=2e-2)


def test_bad_labels_are_reported():
    with pytest.raises(ValueError, match=r"\[0, 3\)"):
        batch_softmax_loss(Q, C, torch.tensor([0, 3]), TAU)
    with pytest.raises(ValueError, match="both"):
        batch_softmax_loss(Q, C, LABELS, TAU, query_item_ids=torch.tensor([1, 2]))
