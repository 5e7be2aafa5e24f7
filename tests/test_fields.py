"""The maths of drift.py: parity with float64 transcriptions, analytic identities, and refusal of bad input."""

import math

import pytest
import torch

from drift import (NystromField, build_nystrom_fields, drift_field, drift_loss, feature_scale, field_fidelity,
                   mean_shift_field, normalised_drift, select_landmarks)


def gen(seed=0):
    return torch.Generator().manual_seed(seed)


def algorithm2_float64(x, y_pos, y_neg, temperature, mask_self, neg_weights=None, floor=0.0):
    """Algorithm 2 of Deng et al., written as plainly as possible in float64 (the reference). floor > 0: their
    released code's sqrt(clip(softmax_row * softmax_col, floor^2)), the masked diagonal included."""
    x, y_pos, y_neg = x.double(), y_pos.double(), y_neg.double()
    logits = -torch.cdist(x, torch.cat([y_pos, y_neg])) / temperature
    if mask_self:
        logits[:, len(y_pos):len(y_pos) + len(x)] -= torch.diag(torch.full((len(x),), math.inf, dtype=x.dtype))
    a = (logits.softmax(dim=-1) * logits.softmax(dim=-2)).clamp_min(floor**2).sqrt()
    a_pos, a_neg = a[:, :len(y_pos)], a[:, len(y_pos):]
    if neg_weights is not None:
        a_neg = a_neg * neg_weights.double()
    w_pos = a_pos * a_neg.sum(-1, keepdim=True)
    w_neg = a_neg * a_pos.sum(-1, keepdim=True)
    return w_pos @ y_pos - w_neg @ y_neg


def barycentre_float64(x, y, temperature, kernel="laplace", exclude_self=False):
    r = torch.cdist(x.double(), y.double())
    log_k = -r / temperature if kernel == "laplace" else -r**2 / (2 * temperature**2)
    if exclude_self:
        log_k = log_k - torch.diag(torch.full((len(x),), math.inf, dtype=log_k.dtype))
    return log_k.softmax(-1) @ y.double()


def close(a, b, rel=1e-5):
    """Max error relative to the size of the reference field."""
    return (a.double() - b.double()).abs().max().item() <= rel * b.double().abs().max().item() + 1e-12


# ---- the exact field (Algorithm 2) ----

@pytest.mark.parametrize("temperature", [0.02, 0.1, 0.5, 3.0])
def test_drift_field_matches_float64_algorithm2(temperature):
    g = gen(1)
    x, y_pos = torch.randn(48, 6, generator=g), torch.randn(70, 6, generator=g) * 0.7 + 0.5
    scale = torch.cdist(x, y_pos).mean()  # temperatures relative to the data's mean distance
    t = temperature * scale.item()
    assert close(drift_field(x, y_pos, None, t), algorithm2_float64(x, y_pos, x, t, True))
    y_neg = torch.randn(30, 6, generator=g)
    assert close(drift_field(x, y_pos, y_neg, t), algorithm2_float64(x, y_pos, y_neg, t, False))


@pytest.mark.parametrize("temperature", [0.02, 0.2])
def test_affinity_floor_matches_the_released_codes_clip_and_pulls_by_first_moments(temperature):
    g = gen(11)
    x, y_pos = torch.randn(40, 6, generator=g), torch.randn(60, 6, generator=g) + 1.0
    t = temperature * torch.cdist(x, y_pos).mean().item()
    for y_neg, mask in ((None, True), (torch.randn(25, 6, generator=g), False)):
        ref = algorithm2_float64(x, y_pos, x if y_neg is None else y_neg, t, mask, floor=1e-3)
        got = drift_field(x, y_pos, y_neg, t, affinity_floor=1e-3)
        assert close(got, ref) and not close(got, drift_field(x, y_pos, y_neg, t), rel=1e-3)
    # a floor above every affinity makes A constant: V = c^2 (Nn * sum y_pos - Np * sum y_neg), first moments only
    y_neg = torch.randn(25, 6, generator=g)
    v = drift_field(x, y_pos, y_neg, t, affinity_floor=10.0)
    expected = 100.0 * (len(y_neg) * y_pos.sum(0) - len(y_pos) * y_neg.sum(0))
    assert torch.allclose(v, expected.expand_as(v), rtol=1e-5)


def test_drift_field_cfg_weights_self_mask_and_chunks():
    g = gen(2)
    x, y_pos, y_unc = torch.randn(40, 5, generator=g), torch.randn(50, 5, generator=g), torch.randn(12, 5, generator=g)
    y_neg = torch.cat([x, y_unc])  # CFG layout: the batch itself (self masked), then real unconditional negatives
    w = torch.cat([torch.ones(40), torch.full((12,), 2.5)])
    w[3] = 0.0  # a zero weight must give 0, never (-inf) - (-inf)
    ref = algorithm2_float64(x, y_pos, y_neg, 1.0, True, w)
    v = drift_field(x, y_pos, y_neg, 1.0, neg_weights=w, mask_self=True)
    assert close(v, ref)
    assert close(drift_field(x, y_pos, y_neg, 1.0, neg_weights=w, mask_self=True, chunk_size=7), ref)
    assert close(drift_field(x, y_pos, None, 1.0, neg_weights=torch.ones(40)), drift_field(x, y_pos, None, 1.0))


def test_drift_field_leading_dims_are_independent_fields():
    g = gen(3)
    x, y_pos = torch.randn(2, 3, 20, 4, generator=g), torch.randn(2, 3, 25, 4, generator=g)
    v = drift_field(x, y_pos, None, 0.7)
    for i in range(2):
        for j in range(3):
            assert close(v[i, j], algorithm2_float64(x[i, j], y_pos[i, j], x[i, j], 0.7, True))
    shared = torch.randn(25, 4, generator=g)  # positives broadcast over the leading dims
    assert close(drift_field(x, shared, None, 0.7)[1, 2], algorithm2_float64(x[1, 2], shared, x[1, 2], 0.7, True))


def test_fields_vanish_when_positives_equal_negatives_and_flip_when_swapped():
    g = gen(4)
    x, p, q = torch.randn(30, 3, generator=g), torch.randn(40, 3, generator=g), torch.randn(35, 3, generator=g) + 1
    for kernel in ("laplace", "gaussian"):
        assert mean_shift_field(x, p, p, 0.5, kernel).abs().max() < 1e-6  # V_{p,p} = 0
        v_pq, v_qp = mean_shift_field(x, p, q, 0.5, kernel), mean_shift_field(x, q, p, 0.5, kernel)
        assert torch.allclose(v_pq, -v_qp, atol=1e-6) and v_pq.abs().max() > 1e-2  # anti-symmetry, non-trivial
    assert drift_field(x, p, p, 0.5).abs().max() < 1e-6  # Algorithm 2 is anti-symmetric too
    assert torch.allclose(drift_field(x, p, q, 0.5), -drift_field(x, q, p, 0.5), atol=1e-6)


def test_mean_shift_matches_float64_barycentres_with_self_mask():
    g = gen(5)
    x, y_pos = torch.randn(25, 4, generator=g), torch.randn(60, 4, generator=g)
    for kernel in ("laplace", "gaussian"):
        ref = barycentre_float64(x, y_pos, 0.8, kernel) - barycentre_float64(x, x, 0.8, kernel, exclude_self=True)
        assert close(mean_shift_field(x, y_pos, None, 0.8, kernel), ref)


# ---- identities (Tweedie: the Gaussian mean shift is T^2 times a difference of smoothed scores) ----

def test_gaussian_mean_shift_is_difference_of_kde_scores():
    g = gen(6)
    t = 0.6
    p, q = torch.randn(50, 2, generator=g, dtype=torch.float64), torch.randn(40, 2, generator=g, dtype=torch.float64) + 1
    x = (torch.randn(30, 2, generator=g, dtype=torch.float64) * 1.5).requires_grad_()

    def log_kde(samples):  # log of the Gaussian KDE p_T(x) = mean_j N(x; y_j, T^2 I), up to a constant
        return torch.logsumexp(-torch.cdist(x, samples) ** 2 / (2 * t * t), dim=-1)

    score_p, = torch.autograd.grad(log_kde(p).sum(), x)
    score_q, = torch.autograd.grad(log_kde(q).sum(), x)
    v = mean_shift_field(x.detach(), p, q, t, kernel="gaussian")
    assert v.dtype == torch.float64
    assert torch.allclose(v, t * t * (score_p - score_q), atol=1e-10)


def test_gaussian_mean_shift_converges_to_mixture_scores():
    g = gen(7)
    t, n = 0.5, 40000
    means_p, means_q = torch.tensor([[-1.5, 0.0], [1.5, 0.5]]), torch.tensor([[0.0, 1.0]])
    std_p, std_q = 0.4, 0.8
    p = means_p[torch.randint(0, 2, (n,), generator=g)] + std_p * torch.randn(n, 2, generator=g)
    q = means_q[torch.randint(0, 1, (n,), generator=g)] + std_q * torch.randn(n, 2, generator=g)
    x = torch.randn(64, 2, generator=g, dtype=torch.float64).mul(0.8).requires_grad_()

    def log_mixture(means, std):  # p_T is the mixture with variances std^2 + T^2 (equal weights)
        var = std**2 + t**2
        return torch.logsumexp(-torch.cdist(x, means.double()) ** 2 / (2 * var), dim=-1)

    score_p, = torch.autograd.grad(log_mixture(means_p, std_p).sum(), x)
    score_q, = torch.autograd.grad(log_mixture(means_q, std_q).sum(), x)
    target = t * t * (score_p - score_q)
    v = mean_shift_field(x.detach(), p.double(), q.double(), t, kernel="gaussian")
    assert field_fidelity(v, target)["cos"] > 0.99
    assert (v - target).norm() / target.norm() < 0.06  # Monte Carlo error at 40k samples


# ---- numerical care ----

def test_no_nan_at_small_temperature_far_queries_and_duplicates():
    g = gen(8)
    y_pos = torch.randn(50, 8, generator=g)
    x = torch.cat([torch.randn(20, 8, generator=g), y_pos[:5], y_pos[:5], torch.full((3, 8), 1e3)])  # dups, far
    for t in (0.005, 0.05):
        for v in (drift_field(x, y_pos, None, t), mean_shift_field(x, y_pos, None, t),
                  NystromField(y_pos[:20], t).fit(y_pos)(x)):
            assert torch.isfinite(v).all()
    # far queries: a naive float32 exp underflows to 0/0 here; log space gives the nearest positive's pull
    v = mean_shift_field(torch.full((1, 8), 1e3), y_pos, y_pos[:1] * 0, 0.005)
    nearest = y_pos[torch.cdist(torch.full((1, 8), 1e3), y_pos).argmin()]
    assert torch.allclose(v[0], nearest, atol=1e-4)


def test_loss_under_bf16_autocast_is_finite_and_fields_stay_fp32():
    g = gen(9)
    torch.manual_seed(0)  # the layer's init: about 1 in 100 draws puts a bf16 rounding past close()'s tolerance
    net = torch.nn.Linear(4, 16)
    y_pos = torch.randn(64, 16, generator=g)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        x = net(torch.randn(48, 4, generator=g))
        assert x.dtype == torch.bfloat16
        v = drift_field(x, y_pos, None, 0.02 * 4)
        loss, stats = drift_loss(x, y_pos)
    assert v.dtype == torch.float32 and torch.isfinite(v).all()
    assert close(v, algorithm2_float64(x.float(), y_pos, x.float(), 0.08, True))
    loss.backward()
    assert torch.isfinite(loss) and all(torch.isfinite(p.grad).all() for p in net.parameters())


def test_clear_errors_for_bad_input():
    x = torch.randn(10, 4)
    with pytest.raises(ValueError, match="dimension"):
        drift_field(x, torch.randn(5, 3))
    with pytest.raises(ValueError, match="empty"):
        mean_shift_field(x, torch.randn(0, 4))
    with pytest.raises(ValueError, match="only 10 samples"):
        select_landmarks(x, 11)
    with pytest.raises(ValueError, match="class 1 has 3"):
        select_landmarks(x, 4, labels=torch.tensor([0] * 7 + [1] * 3))
    with pytest.raises(ValueError, match="temperature"):
        drift_field(x, x, None, 0.0)
    with pytest.raises(ValueError, match="kernel"):
        mean_shift_field(x, x, None, 0.1, kernel="cosine")
    with pytest.raises(ValueError, match="strategy"):
        select_landmarks(x, 3, strategy="best")
    with pytest.raises(ValueError, match="dimension"):
        NystromField(x[:3]).fit(torch.randn(5, 3))
    with pytest.raises(RuntimeError, match="fit"):
        NystromField(x[:3]).attraction(x)


# ---- the projected (Nystrom) field ----

def test_nystrom_equals_exact_barycentre_when_every_positive_is_a_landmark():
    g = gen(10)
    y_pos, x = torch.randn(80, 5, generator=g), torch.randn(30, 5, generator=g)
    for kernel in ("laplace", "gaussian"):
        field = NystromField(y_pos, temperature=1.0, ridge=1e-10, kernel=kernel).fit(y_pos)
        assert close(field.attraction(x), barycentre_float64(x, y_pos, 1.0, kernel), rel=1e-4)
        # and the full field (exact repulsion over the batch) equals the exact one-sided field
        assert close(field(x), mean_shift_field(x, y_pos, None, 1.0, kernel), rel=1e-4)


def test_nystrom_fidelity_grows_with_landmarks():
    g = gen(11)
    y_pos, x = torch.randn(400, 8, generator=g), torch.randn(200, 8, generator=g)
    exact = barycentre_float64(x, y_pos, 2.0)
    cos = []
    for m in (25, 100, 400):
        u = select_landmarks(y_pos, m, "random", generator=gen(0))
        cos.append(field_fidelity(NystromField(u, 2.0).fit(y_pos).attraction(x), exact)["cos"])
    assert cos[0] < cos[1] < cos[2] and cos[2] > 0.999


def test_folded_and_unfolded_forms_agree():
    g = gen(12)
    y_pos, x = torch.randn(300, 6, generator=g), torch.randn(50, 6, generator=g)
    u = select_landmarks(y_pos, 40, "kmeans", generator=gen(1))
    folded = NystromField(u, 1.5, folded=True).fit(y_pos).attraction(x)
    unfolded = NystromField(u, 1.5, folded=False).fit(y_pos).attraction(x)
    assert close(folded, unfolded, rel=1e-4)


def test_summaries_from_chunks_and_shards_equal_one_shot():
    g = gen(13)
    y_pos, labels = torch.randn(500, 4, generator=g), torch.randint(0, 3, (500,), generator=g)
    u = select_landmarks(y_pos, 10, "random", labels=labels, generator=gen(2))  # (3, 10, 4) per class
    one = NystromField(u, 1.0).fit(y_pos, labels=labels)
    chunked = NystromField(u, 1.0).fit([(y_pos[i:i + 64], labels[i:i + 64]) for i in range(0, 500, 64)])
    shard_a = NystromField(u, 1.0).fit(y_pos[:200], labels=labels[:200])
    shard_b = NystromField(u, 1.0).fit(y_pos[200:], labels=labels[200:])
    for field in (chunked,):
        assert torch.allclose(field.s, one.s, rtol=1e-12) and torch.allclose(field.S, one.S, rtol=1e-12, atol=1e-12)
    assert torch.allclose(shard_a.s + shard_b.s, one.s, rtol=1e-12)
    assert torch.allclose(shard_a.S + shard_b.S, one.S, rtol=1e-12, atol=1e-12)
    # per class: each class is attracted to its own data only
    x = torch.randn(3, 20, 4, generator=g)
    v = one.attraction(x, classes=torch.tensor([2, 0, 1]))
    alone = NystromField(u[0], 1.0).fit(y_pos[labels == 0]).attraction(x[1])
    assert close(v[1], alone)


def test_a_batch_with_every_class_once_gets_each_class_its_own_field_in_any_order():
    # every class once: the queries are reordered into the landmarks' class order (no copy of the summaries);
    # each row must get what picking its class's landmarks gives, and what that class's field alone gives
    g = gen(14)
    y_pos, labels = torch.randn(400, 5, generator=g), torch.randint(0, 4, (400,), generator=g)
    u = select_landmarks(y_pos, 8, "random", labels=labels, generator=gen(3))  # (4, 8, 5)
    field = NystromField(u, 1.5).fit(y_pos, labels=labels)
    x = torch.randn(2, 4, 6, 5, generator=g)  # (locations, classes, N, D)
    perm = torch.tensor([2, 0, 3, 1])
    v = field.attraction(x, perm)
    assert torch.equal(field.attraction(x, perm), v)  # the landmarks centred once are reused as they were
    for k, c in enumerate(perm.tolist()):
        picked = field.attraction(x[:, k:k + 1], perm[k:k + 1])  # one class: its landmarks picked out
        alone = NystromField(u[c], 1.5).fit(y_pos[labels == c]).attraction(x[:, k])
        assert close(v[:, k:k + 1], picked, rel=1e-6) and close(v[:, k], alone)
    # a class twice and one missing is not a reordering: it takes the picking path, with the same answer per row
    twice = torch.tensor([2, 2, 0, 1])
    w = field.attraction(x, twice)
    assert close(w[:, 0], v[:, 0], rel=1e-6) and close(w[:, 1], field.attraction(x[:, 1:2], perm[:1])[:, 0], rel=1e-6)


def test_field_fidelity_definitions():
    v = torch.tensor([[1.0, 0.0], [0.0, 2.0]])
    approx = torch.tensor([[1.0, 1.0], [0.0, 2.0]])
    f = field_fidelity(approx, v)
    assert math.isclose(f["cos"], (1 / math.sqrt(2) + 1) / 2, rel_tol=1e-9)
    assert math.isclose(f["rel_l2"], 1 / math.sqrt(5), rel_tol=1e-9)
    assert math.isclose(f["target_mse"], (1 / 2 + 0) / 2, rel_tol=1e-9)


# ---- landmarks ----

def test_landmarks_are_distinct_real_samples_and_reproducible():
    g = gen(15)
    y = torch.cat([torch.randn(100, 2, generator=g) * 0.1 + c for c in torch.tensor([[0, 0], [5, 5], [-5, 5]])])
    labels = torch.arange(300) // 100
    for strategy in ("random", "kmeans", "kcenter"):
        u, idx = select_landmarks(y, 6, strategy, generator=gen(3), return_index=True)
        assert torch.equal(u, y[idx]) and len(set(idx.tolist())) == 6
        assert torch.equal(u, select_landmarks(y, 6, strategy, generator=gen(3)))
        per_class, idx = select_landmarks(y, 4, strategy, labels=labels, generator=gen(3), return_index=True)
        assert per_class.shape == (3, 4, 2) and torch.equal(labels[idx], torch.arange(3)[:, None].expand(3, 4))
    # k-means and k-center cover all three clusters with 3 landmarks; k-center takes the farthest points
    for strategy in ("kmeans", "kcenter"):
        u = select_landmarks(y, 3, strategy, generator=gen(4))
        assert sorted(torch.cdist(u, torch.tensor([[0.0, 0], [5, 5], [-5, 5]])).argmin(-1).tolist()) == [0, 1, 2]


# ---- normalisation and loss ----

def test_feature_scale_puts_mean_distance_at_sqrt_c():
    g = gen(16)
    x = torch.randn(2, 40, 12, generator=g) * 7.0
    s = feature_scale(x)
    d = torch.cdist(x / s, x / s)
    off_diagonal = d.sum() / (2 * 40 * 39)
    assert math.isclose(off_diagonal.item(), math.sqrt(12), rel_tol=1e-4)


def test_loss_gradient_is_minus_two_v_over_numel():
    g = gen(17)
    x = torch.randn(3, 32, 10, generator=g).requires_grad_()
    y_pos = torch.randn(3, 50, 10, generator=g) + 0.3
    loss, stats = drift_loss(x, y_pos, temperatures=(0.05,))
    loss.backward()
    s = stats["scale"]
    v = drift_field(x.detach() / s, y_pos / s, None, 0.05 * math.sqrt(10))
    v = v / v.square().mean().sqrt()
    grad_normalised = x.grad * s  # dL/d(x/S) = S dL/dx, since S is a stop-grad constant
    assert close(grad_normalised, -2 * v / x.numel(), rel=1e-4)
    assert math.isclose(loss.item(), v.square().mean().item(), rel_tol=1e-4)  # value = ||V||^2 per element


def test_nystrom_loss_matches_exact_one_sided_loss_with_full_landmarks():
    g = gen(18)
    y_pos = torch.randn(2, 3, 40, 6, generator=g)  # (locations, classes, n, C)
    labels = torch.arange(3).repeat_interleave(40)
    y_flat = y_pos.permute(0, 1, 2, 3).reshape(2, 120, 6)  # samples in label order
    scale = feature_scale(y_flat)
    fields = build_nystrom_fields(y_flat, y_pos, (0.05, 0.2), scale, labels=labels, ridge=1e-10)
    x = torch.randn(2, 2, 16, 6, generator=g).requires_grad_()
    classes = torch.tensor([2, 0])
    loss, stats = drift_loss(x, temperatures=(0.05, 0.2), field="nystrom", nystrom=fields, scale=scale,
                             classes=classes)
    v = 0
    for t in (0.05, 0.2):
        vt = mean_shift_field(x.detach() / scale, y_pos[:, classes] / scale, None, t * math.sqrt(6))
        v = v + vt / vt.square().mean().sqrt()
    assert math.isclose(loss.item(), v.square().mean().item(), rel_tol=1e-3)
    with pytest.raises(ValueError, match="temperature"):
        drift_loss(x, temperatures=(0.02, 0.2), field="nystrom", nystrom=fields, scale=scale, classes=classes)


def test_nystrom_falls_back_to_landmark_barycentre_where_projected_density_vanishes():
    g = gen(19)
    y_pos = torch.randn(200, 4, generator=g)
    field = NystromField(y_pos[:30], 0.5).fit(y_pos)
    x = torch.randn(10, 4, generator=g)
    field.min_density = math.inf  # every row fails the guard: the result is the landmarks' own barycentre
    assert close(field.attraction(x), barycentre_float64(x, y_pos[:30], 0.5))
    field.min_density = -math.inf  # no row fails: the plain ratio phi^T S / phi^T s
    phi = field.features(x.double(), shift=True)
    assert close(field.attraction(x), (phi @ field.S) / (phi @ field.s)[:, None], rel=1e-4)


def test_loss_broadcasts_cfg_weights_and_shared_positives_over_leading_dims():
    g = gen(20)
    x = torch.randn(2, 3, 12, 5, generator=g)  # (locations, classes, N, C)
    y_pos, y_unc = torch.randn(2, 3, 20, 5, generator=g), torch.randn(2, 3, 4, 5, generator=g)
    w = torch.cat([torch.ones(3, 12), torch.rand(3, 4, generator=g) * 3], -1)  # per class, shared by locations
    y_neg = torch.cat([x, y_unc], -2)
    loss, stats = drift_loss(x, y_pos, y_neg, neg_weights=w, mask_self=True)
    loss_full, stats_full = drift_loss(x, y_pos, y_neg, neg_weights=w.expand(2, 3, 16), mask_self=True)
    assert torch.equal(stats["scale"], stats_full["scale"]) and math.isclose(loss.item(), loss_full.item())
    # the scale is the CFG-weighted mean distance to every column the kernel sees, self pairs left out
    d = torch.cdist(x, torch.cat([y_neg, y_pos], -2))
    weights = torch.cat([w.expand(2, 3, 16), torch.ones(2, 3, 20)], -1).unsqueeze(-2).expand_as(d).clone()
    weights[..., :12].diagonal(dim1=-2, dim2=-1).zero_()
    assert math.isclose(stats["scale"].item(), ((d * weights).sum() / weights.sum() / math.sqrt(5)).item(), rel_tol=1e-5)


# ---- nothing silent: bad input is refused where it enters, with what was wrong ----

def fitted_per_class(seed=21):
    g = gen(seed)
    y, labels = torch.randn(60, 4, generator=g), torch.arange(60) % 3
    return NystromField(select_landmarks(y, 5, labels=labels, generator=gen(0)), 1.0).fit(y, labels=labels), y, labels


def poisoned(t, row=17, value=math.nan):
    t = t.clone()
    t[..., row, 1] = value
    return t


@pytest.mark.parametrize("case", ["fit", "landmarks", "select_landmarks", "drift_field", "mean_shift", "nystrom_query", "nystrom_neg",
                                  "weights", "feature_scale", "drift_loss"])
def test_a_nan_or_inf_is_refused_and_named_where_it_enters(case):
    g = gen(22)
    x, y = torch.randn(30, 4, generator=g), torch.randn(40, 4, generator=g)
    field = NystromField(y[:10], 1.0).fit(y)
    calls = {  # one NaN or inf row used to poison the summaries, the field or the loss silently
        "fit": (lambda: NystromField(y[:10], 1.0).fit(poisoned(y)), "y_pos has 1 non-finite value.*row 17"),
        "landmarks": (lambda: NystromField(poisoned(y)), "landmarks has 1 non-finite"),
        "select_landmarks": (lambda: select_landmarks(poisoned(y), 5, "kmeans"), "y has 1 non-finite.*row 17"),
        "drift_field": (lambda: drift_field(poisoned(x, 3, math.inf), y), "x has 1 non-finite.*row 3"),
        "mean_shift": (lambda: mean_shift_field(x, y, poisoned(y)), "y_neg has 1 non-finite"),
        "nystrom_query": (lambda: field(poisoned(x)), "x has 1 non-finite"),
        "nystrom_neg": (lambda: field(x, poisoned(y)), "y_neg has 1 non-finite"),
        "weights": (lambda: mean_shift_field(x, y, y, neg_weights=poisoned(torch.ones(1, 40), 0)[0]), "neg_weights"),
        "feature_scale": (lambda: feature_scale(poisoned(x)), "x has 1 non-finite"),
        "drift_loss": (lambda: drift_loss(x, poisoned(y, 5, -math.inf)), "y_pos has 1 non-finite.*row 5"),
    }
    call, message = calls[case]
    with pytest.raises(ValueError, match=message):
        call()


def test_large_finite_values_are_not_mistaken_for_non_finite_ones():
    x = torch.full((30, 4), 1000.0, dtype=torch.float16) + torch.randn(30, 4).half()  # its float16 sum overflows
    assert torch.isinf(x.sum()) and torch.isfinite(mean_shift_field(x, x[:10] + 1)).all()


def test_layouts_where_a_query_has_no_negative_of_positive_weight_are_refused():
    g = gen(23)
    y_pos, y_unc = torch.randn(3, 20, 4, generator=g), torch.randn(3, 4, 4, generator=g)
    field = NystromField(y_pos[0, :8], 1.0).fit(y_pos[0])
    one = torch.randn(3, 1, 4, generator=g)  # gen_per_class 1: each query is its own only generated negative
    alpha_one = torch.cat([torch.ones(3, 1), torch.zeros(3, 4)], -1)  # CFG alpha = 1: unconditional weights 0
    for call in (lambda: drift_field(one, y_pos),  # V was exactly 0
                 lambda: field(one[0]),  # repulsion 0/1e-30: V was the attraction's absolute position
                 lambda: drift_field(one, y_pos, torch.cat([one, y_unc], -2), 1.0, alpha_one, mask_self=True),
                 lambda: mean_shift_field(one, y_pos, torch.cat([one, y_unc], -2), 1.0, neg_weights=alpha_one, mask_self=True),
                 lambda: mean_shift_field(y_pos[0], y_pos[1], y_unc[0], 1.0, neg_weights=torch.zeros(4)),
                 lambda: field(y_pos[0], y_unc[0], neg_weights=torch.zeros(4))):
        with pytest.raises(ValueError, match="no negative of positive weight"):
            call()
    with pytest.raises(ValueError, match=">= 0"):
        mean_shift_field(y_pos[0], y_pos[1], y_unc[0], 1.0, neg_weights=torch.tensor([1.0, -1.0, 1.0, 1.0]))
    with pytest.raises(ValueError, match="no pair"):
        feature_scale(one[0])  # was 1e-12: every feature then blew up by 1e12
    # allowed: zero weight for SOME negatives (alpha = 1 with 2+ generated samples per class) drops them
    x = torch.randn(3, 5, 4, generator=g)
    w = torch.cat([torch.ones(3, 5), torch.zeros(3, 4)], -1)
    v = mean_shift_field(x, y_pos, torch.cat([x, y_unc], -2), 1.0, neg_weights=w, mask_self=True)
    assert close(v, mean_shift_field(x, y_pos, None, 1.0))
    assert torch.isfinite(drift_field(x, y_pos, torch.cat([x, y_unc], -2), 1.0, w, mask_self=True)).all()


def test_nystrom_takes_float64_and_half_queries_like_the_other_fields():
    g = gen(24)
    y_pos, x = torch.randn(80, 5, generator=g), torch.randn(30, 5, generator=g)
    for folded in (True, False):
        field = NystromField(y_pos[:20], 1.0, folded=folded).fit(y_pos)
        v32, v64 = field(x), field(x.double())
        assert v64.dtype == drift_field(x.double(), y_pos).dtype == torch.float64
        assert close(v64, v32, rel=1e-4)
        for half in (torch.float16, torch.bfloat16):
            v = field(x.to(half))
            assert v.dtype == torch.float32 and close(v, field(x.to(half).float()))
    # per class too, where the unfolded (and so the float64) path used to pick s along the wrong dim
    _, y, labels = fitted_per_class()
    u, queries, classes = select_landmarks(y, 5, labels=labels, generator=gen(0)), torch.randn(2, 7, 4), torch.tensor([2, 0])
    folded = NystromField(u, 1.0).fit(y, labels=labels).attraction(queries, classes)
    unfolded = NystromField(u, 1.0, folded=False).fit(y, labels=labels)
    assert close(unfolded.attraction(queries, classes), folded, rel=1e-4)
    assert close(unfolded.attraction(queries.double(), classes), folded, rel=1e-4)


@pytest.mark.parametrize("kwargs, message", [
    ({"y_pos": torch.randn(20, 3)}, "dimension 3"),
    ({"y_pos": torch.randn(4, 20, 4)}, "leading dims"),
    ({"temperatures": ()}, "non-empty"),
    ({"temperatures": (0.05, math.inf)}, "positive finite"),
    ({"temperatures": (math.nan,)}, "positive finite"),
    ({"y_neg": torch.randn(2, 6, 4), "neg_weights": torch.ones(5)}, "must be 6 weights >= 0.*got 5"),
    ({"x": [[0.0, 1.0, 2.0, 3.0]]}, "x must be a non-empty tensor"),
    ({"scale": math.nan}, "scale must be positive"),
    ({"field": "nystrom", "classes": torch.tensor([0, 3])}, "classes must be"),
    ({"field": "nystrom", "classes": torch.tensor([0, 1]), "y_pos": torch.randn(2, 20, 4)}, "pass y_pos=None"),
    ({"field": "nystrom", "classes": torch.tensor([-1, 0])}, "classes must be"),
    ({"field": "nystrom", "classes": torch.tensor([0, 1]), "x": torch.randn(2, 6, 3)}, "dimension 3 but the Nys"),
])
def test_drift_loss_refuses_what_the_fields_refuse_with_a_value_error(kwargs, message):
    g = gen(25)
    fields = build_nystrom_fields(torch.randn(60, 4, generator=g), torch.randn(3, 5, 4, generator=g), (0.05,),
                                  1.0, labels=torch.arange(60) % 3)
    args = {"x": torch.randn(2, 6, 4, generator=g), "y_pos": torch.randn(2, 20, 4, generator=g), "temperatures": (0.05,)}
    if kwargs.get("field") == "nystrom":
        args.update(y_pos=None, nystrom=fields, scale=1.0)
    args.update(kwargs)
    with pytest.raises(ValueError, match=message):
        drift_loss(**args)


def test_drift_loss_checks_once_inside_and_every_call_still_checks_after_it_raised_there():
    g = gen(26)
    one, y_pos = torch.randn(3, 1, 4, generator=g), torch.randn(3, 20, 4, generator=g)
    with pytest.raises(ValueError, match="no negative of positive weight"):
        drift_loss(one, y_pos)  # raised by drift_field inside drift_loss, where the input checks are skipped
    with pytest.raises(ValueError, match="x has 1 non-finite"):
        drift_field(poisoned(torch.randn(30, 4), 3), y_pos[0])  # the skip did not outlive the error
    x = torch.randn(3, 6, 4, generator=g)  # and the loss is the same whether its inner calls check or not
    loss, stats = drift_loss(x, y_pos, temperatures=(0.05, 0.2))
    x_n, y_n = x / stats["scale"], y_pos / stats["scale"]
    v = sum(drift_field(x_n, y_n, None, t * 2.0) / drift_field(x_n, y_n, None, t * 2.0).square().mean().sqrt()
            for t in (0.05, 0.2))
    assert math.isclose(loss.item(), v.square().mean().item(), rel_tol=1e-5)


def test_drift_loss_reads_tensor_values_on_the_host_only_for_its_one_round_of_checks(monkeypatch):
    # each read (bool, item, ...) of a CUDA tensor waits for the GPU; the inner calls used to check again:
    # 12 reads a call (18 with CFG weights), for one field per feature group and step
    reads = []
    for name in ("__bool__", "item", "tolist", "__int__", "__float__"):
        original = getattr(torch.Tensor, name)
        monkeypatch.setattr(torch.Tensor, name, lambda self, *a, _f=original, **k: reads.append(1) or _f(self, *a, **k))
    g = gen(27)
    x, y_pos = torch.randn(10, 16, 8, generator=g), torch.randn(10, 64, 8, generator=g)
    y_neg = torch.cat([x, torch.randn(10, 16, 8, generator=g)], -2)
    weights = torch.cat([torch.ones(10, 16), torch.full((10, 16), 0.5)], -1)
    drift_loss(x, y_pos)
    assert len(reads) == 2  # finite inputs; a negative for every query (a CPU tensor here, no GPU wait)
    reads.clear()
    drift_loss(x, y_pos, y_neg, neg_weights=weights, mask_self=True)
    assert len(reads) == 3  # and the weights >= 0


def test_infinite_temperatures_bad_classes_and_bad_labels_are_refused_everywhere():
    x, y = torch.randn(10, 4), torch.randn(20, 4)
    for call in (lambda: drift_field(x, y, None, math.inf), lambda: mean_shift_field(x, y, None, math.inf),
                 lambda: NystromField(y[:5], math.inf), lambda: NystromField(y[:5], -1.0),
                 lambda: normalised_drift(x, y, None, (0.05, math.inf))):
        with pytest.raises(ValueError, match="temperature"):
            call()
    field, y, labels = fitted_per_class()
    queries = torch.randn(2, 7, 4)
    for classes in ([0, 3], [-1, 0], [0]):  # out of range, negative (was the last class), one per field of x
        with pytest.raises(ValueError, match="classes must be"):
            field.attraction(queries, classes=torch.tensor(classes))
    flat = NystromField(y[:4], 1.0).fit(y)  # without per-class landmarks, classes used to pick feature columns
    with pytest.raises(ValueError, match="classes must be"):
        flat.attraction(torch.randn(4, 7, 4), classes=torch.tensor([0, 0, 0, 0]))
    for bad in (labels - 1, labels[:50]):  # a negative label fed the last class; a short one raised IndexError
        with pytest.raises(ValueError, match="labels must be"):
            NystromField(field.landmarks, 1.0).fit(y, labels=bad)
        with pytest.raises(ValueError, match="labels must be"):  # negative labels were left out of every class
            select_landmarks(y, 2, labels=bad)
