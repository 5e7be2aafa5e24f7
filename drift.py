"""
Drifting models and DriftXpress in one file: drifting fields (exact and projected), landmarks, feature normalisation
and the drifting loss, the frozen-encoder wrapper and the one-step generator.

A drifting model trains a one-step generator x = f(noise) with the loss MSE(x, stopgrad(x + V)): V attracts the samples
to the data and repels them from each other, and at equilibrium V = 0 and the generated distribution equals the data's.

References:
1) Deng, Li, Li, Du, He, "Generative Modeling via Drifting", arXiv 2602.04770. Alg. 1 (training step), Alg. 2 (the
   field), Eq. 8-10 (mean shift), §3.5 and A.7 (CFG), A.5 (multi-scale features), A.6 (feature and drift normalisation).
2) Falahati, Creager, Kamath, Mohapatra, "DriftXpress: Faster Drifting Models via Projected RKHS Fields",
   arXiv 2605.12183. Nystrom features phi(x) = k(x,U)(k(U,U) + ridge I)^(-1/2), cached summaries.
3) "A Unified View of Score-Based and Drifting Models", arXiv 2603.07514: the Gaussian-kernel mean shift
   is T^2 (grad log p_T - grad log q_T) (Tweedie), tested in tests/test_fields.py.
"""

import contextlib
import hashlib
import math
import os
import threading

import torch
import torch.nn as nn
import torch.nn.functional as F

# ----------------------------------------------------------------------------------------------------------
# kernels and fields

KERNELS = ("laplace", "gaussian")
FIELD_MEMORY = 1 << 29  # bytes: drift_field keeps the [..., N, Np+Nn] float32 distances whole up to this size
EXP_FLOOR = -87.0  # exp(-87) = 1.6e-38, the smallest normal float32: below it x86 exp runs 10-20x slower
_checked = threading.local()  # .on: drift_loss or normalised_drift checked the inputs its inner calls get


def _check_temperature(*temperatures):
    for t in temperatures:  # T = inf makes the kernel flat, T <= 0 or NaN meaningless
        if not 0 < t < math.inf:
            raise ValueError(f"temperature must be a positive finite number (e.g. 0.05), got {t}")


def _trusted():
    return getattr(_checked, "on", False)


@contextlib.contextmanager
def _inputs_checked():  # inside, the input checks trust: no second pass over the data, no GPU sync to report it
    before, _checked.on = _trusted(), True
    try:
        yield
    finally:
        _checked.on = before


def _check_points(x, y_pos=None, y_neg=None, weights=None, names=("x", "y_pos", "y_neg")):
    """One clear ValueError for the mistakes people make with point sets [..., N, D] and weights [..., Nn]:
    not a tensor, empty, mismatched dims, NaN or inf (one poisons a whole field silently), negative weights."""
    if _trusted():
        return
    named = [(name, t, dims) for name, t, dims in zip((*names, "neg_weights"), (x, y_pos, y_neg, weights), (2, 2, 2, 1))
             if t is not None]  # dims: 2 for point sets [..., N, D], 1 for weights [..., Nn]
    for name, t, dims in named:
        if not torch.is_tensor(t) or t.dim() < dims or t.shape[-1] == 0 or t.shape[-dims] == 0:
            shape = "[..., N, D]" if dims == 2 else "[..., Nn]"
            raise ValueError(f"{name} must be a non-empty tensor {shape}, got {getattr(t, 'shape', type(t))}")
        if dims == 2 and t.shape[-1] != x.shape[-1]:
            raise ValueError(f"{name} has dimension {t.shape[-1]} but {names[0]} has {x.shape[-1]}: they must match")
    if not torch.isfinite(sum(t.detach().sum() for _, t, _ in named)):  # one fast pass and one sync for all
        for name, t, dims in named:  # a NaN or inf makes the sum non-finite (so may an overflow: look closer)
            bad = ~torch.isfinite(t)
            if bad.any():
                first = bad.nonzero()[0].tolist()
                raise ValueError(f"{name} has {int(bad.sum())} non-finite value(s) (NaN or inf), the first in row "
                                 f"{first[-dims]} (index {tuple(first)}): drop or repair them before computing a field")
    n_neg = (x if y_neg is None else y_neg).shape[-2]
    if weights is not None and (weights.shape[-1] != n_neg or (weights < 0).any()):
        raise ValueError(f"neg_weights must be {n_neg} weights >= 0, one per negative (0 drops it), got "
                         f"{weights.shape[-1]} with min {weights.min().item():g}")


def _fp32(t):
    """Fields are computed in float32 at least, whatever the inputs or autocast say."""
    return None if t is None else t.detach().to(torch.promote_types(t.dtype, torch.float32))


def _centred(y):
    """(mean [..., 1, D], y - mean, squared row norms [..., M]) of y [..., M, D], for pairwise_distance to reuse."""
    centre = y.mean(-2, keepdim=True)  # distances are translation invariant; centring cuts rounding error
    y = y - centre
    return centre, y, torch.linalg.vector_norm(y, dim=-1).square_()


def pairwise_distance(x, y, y_centred=None):
    """L2 distances (not squared) between rows: x [..., N, D], y [..., M, D] -> [..., N, M]; y_centred: _centred(y)."""
    centre, y, y_sq = y_centred or _centred(y)
    batch = torch.broadcast_shapes(x.shape[:-2], y.shape[:-2])
    x = (x - centre).expand(*batch, *x.shape[-2:]).reshape(-1, *x.shape[-2:])  # (B, N, D)
    y_sq = y_sq.expand(*batch, y.shape[-2]).reshape(-1, 1, y.shape[-2])  # (B, 1, M)
    y = y.expand(*batch, *y.shape[-2:]).reshape(-1, *y.shape[-2:])  # (B, M, D)
    # |x|^2 + |y|^2 - 2 x.y with the |y|^2 term fused into the matmul; rounding can dip below zero
    d2 = torch.baddbmm(y_sq, x, y.mT, alpha=-2)  # (B, N, M)
    d2.add_(torch.linalg.vector_norm(x, dim=-1, keepdim=True).square_())  # norms without (N, D) temporaries
    return d2.clamp_min_(0).sqrt_().view(*batch, x.shape[1], y.shape[1])


def log_kernel(x, y, temperature, kernel="laplace", y_centred=None):
    """log k(x, y): laplace k = exp(-r/T), gaussian k = exp(-r^2 / (2 T^2)); [..., N, M]."""
    if kernel not in KERNELS:
        raise ValueError(f"unknown kernel {kernel!r}; choose one of {KERNELS}")
    _check_temperature(temperature)
    r = pairwise_distance(x, y, y_centred)
    return r.mul_(-1.0 / temperature) if kernel == "laplace" else r.square_().mul_(-0.5 / temperature**2)


def _negatives(x, y_neg, mask_self, weights=None):
    """Resolve the negatives (None: the queries themselves, own column masked) and refuse a layout where some
    query has no negative of positive weight left: its repulsion would be 0/0, its field 0 or the attraction."""
    y_neg, mask_self = (x, True) if y_neg is None else (y_neg, bool(mask_self))
    n, n_neg = x.shape[-2], y_neg.shape[-2]
    if mask_self and n_neg < n:
        raise ValueError("mask_self=True needs the first N negatives to be the N queries themselves")
    alive = torch.ones(n_neg, dtype=torch.long) if weights is None else (weights > 0).long()  # (..., Nn)
    left = alive.sum(-1, keepdim=True) - (alive[..., :n] if mask_self else 0)  # (..., N) negatives a query sees
    if not _trusted() and left.min() < 1:
        raise ValueError(f"query {int(left.flatten().argmin()) % left.shape[-1]} has no negative of positive weight "
                         "(other than itself): no field; use >= 2 generated samples per field, or more weights > 0")
    return y_neg, mask_self


def _log_normalisers(energy):
    """log r_i = log sum_j exp(-E_ij) [..., N, 1] and log c_j = log sum_i exp(-E_ij) [..., 1, M], each sum
    shifted by its smallest energy. The exponentials go through one buffer a block of rows at a time: small
    on the CPU (it stays in cache, and fresh memory costs page faults), large on a GPU (fewer launches)."""
    n, m = energy.shape[-2:]
    row_low = energy.amin(-1, keepdim=True).clamp_max_(1e30)  # a fully masked line (all +inf) gives -inf, not NaN
    col_low = energy.amin(-2, keepdim=True).clamp_max_(1e30)
    row_sum, col_sum = torch.empty_like(row_low), torch.zeros_like(col_low)
    step = max(1, (1 << 22 if energy.is_cpu else 1 << 28) // (4 * energy[..., :1, :].numel()))
    buffer = energy.new_empty(*energy.shape[:-2], min(step, n), m)
    for i in range(0, n, step):
        e, low, out = energy[..., i:i + step, :], row_low[..., i:i + step, :], buffer[..., :min(step, n - i), :]
        col_sum += torch.sub(col_low, e, out=out).clamp_min_(EXP_FLOOR).exp_().sum(-2, keepdim=True)
        row_sum[..., i:i + step, :] = torch.sub(low, e, out=out).clamp_min_(EXP_FLOOR).exp_().sum(-1, keepdim=True)
    return row_sum.log_().sub_(row_low), col_sum.log_().sub_(col_low)


def drift_field(x, y_pos, y_neg=None, temperature=0.05, neg_weights=None, mask_self=None, chunk_size=None,
                affinity_floor=0.0):
    """The exact drifting field V [..., N, D], Algorithm 2 of [1], without gradient and in float32.
    x [..., N, D] queries, y_pos [..., Np, D] positives, y_neg [..., Nn, D] negatives (None: x itself, each query's own
    column masked); leading dims are independent fields (classes, feature locations). neg_weights [..., Nn] multiply the
    negatives' entries of A after the softmax (the CFG weights of [1] §3.5). The distances [..., N, Np+Nn] are kept
    whole when they fit in FIELD_MEMORY bytes; otherwise (or with chunk_size, queries per chunk) they are computed a
    chunk at a time twice, for the column normalisers and for the field, at the cost of one more matrix product.
    affinity_floor > 0 raises every entry of A, the masked diagonal too, to at least that value, as Deng et al.'s
    released code does (sqrt(clip(A_row * A_col, 1e-6)): floor 1e-3); 0 is Algorithm 2 as published."""
    _check_points(x, y_pos, y_neg, neg_weights)
    _check_temperature(temperature)
    with torch.no_grad(), torch.autocast(x.device.type, enabled=False):
        x, y_pos, y_neg, neg_weights = _fp32(x), _fp32(y_pos), _fp32(y_neg), _fp32(neg_weights)
        y_neg, mask_self = _negatives(x, y_neg, mask_self, neg_weights)
        n, n_pos = x.shape[-2], y_pos.shape[-2]
        batch = torch.broadcast_shapes(x.shape[:-2], y_pos.shape[:-2], y_neg.shape[:-2])
        y_pos, y_neg = y_pos.expand(*batch, *y_pos.shape[-2:]), y_neg.expand(*batch, *y_neg.shape[-2:])
        y = torch.cat([y_pos, y_neg], -2)  # (..., M, D), M = Np + Nn

        def energy(rows):  # 1. energies E = dist/T = -logits over the joint [pos | neg] columns, self masked
            e = pairwise_distance(x[..., rows, :], y).div_(temperature)  # (..., rows, M)
            if mask_self:
                e[..., :, n_pos + rows.start:n_pos + rows.stop].diagonal(dim1=-2, dim2=-1).fill_(math.inf)
            return e

        step = chunk_size or max(1, FIELD_MEMORY // (4 * y[..., :1].numel()))  # rows whose distances fit
        chunks = [slice(i, min(i + step, n)) for i in range(0, n, step)]
        # 2. log row sums log r_i = logsumexp_j(-E_ij) and log column sums log c_j = logsumexp_i(-E_ij)
        log_row, log_col, cached = x.new_empty(*batch, n, 1), [], None
        for rows in chunks:
            e = energy(rows)
            log_row[..., rows, :], col = _log_normalisers(e)
            log_col.append(col)  # (..., 1, M), over this chunk's rows only
            cached = e if len(chunks) == 1 else None
            del e  # a chunk's distances are freed before the next chunk's are computed
        log_col = log_col[0] if len(chunks) == 1 else torch.stack(log_col).logsumexp(0)
        # halves of the normalisers; a fully masked column (log c = -inf) gives A = 0, not NaN
        half_row, half_col = log_row.mul_(-0.5), log_col.clamp_min_(-1e30).mul_(0.5)

        def field_rows(e, rows):  # V for one chunk of queries; its (rows, M) matrix dies on return
            # 3. A = sqrt(softmax_rows * softmax_cols) = exp(-E_ij - log r_i / 2 - log c_j / 2), in place
            a = torch.sub(half_row[..., rows, :], e, out=e).sub_(half_col).clamp_min_(EXP_FLOOR).exp_()
            a_pos, a_neg = a[..., :n_pos], a[..., n_pos:]  # (..., rows, Np), (..., rows, Nn)
            if affinity_floor > 0:  # the released code's floor, a first-moment pull (DESIGN.md §10)
                a.clamp_min_(affinity_floor)
            elif mask_self:  # exactly 0 rather than exp(EXP_FLOOR)
                a_neg[..., :, rows].diagonal(dim1=-2, dim2=-1).zero_()
            if neg_weights is not None:
                a_neg.mul_(neg_weights.unsqueeze(-2))
            # 4. W_pos = A_pos * rowsum(A_neg), W_neg = A_neg * rowsum(A_pos); V = W_pos y_pos - W_neg y_neg
            sum_pos, sum_neg = a_pos.sum(-1, keepdim=True), a_neg.sum(-1, keepdim=True)
            a_pos.mul_(sum_neg), a_neg.mul_(sum_pos.neg_())
            return a @ y  # (..., rows, D) = [W_pos | -W_neg] @ [y_pos | y_neg], one product

        if cached is not None:
            return field_rows(cached, chunks[0])
        return torch.cat([field_rows(energy(rows), rows) for rows in chunks], -2)


def _barycentre(log_k, y, weights=None):
    """Row-normalised kernel barycentre sum_j k_ij w_j y_j / sum_j k_ij w_j, shifted per row in log space."""
    k = (log_k - log_k.amax(-1, keepdim=True).clamp_min(-1e30)).exp_()  # max entry of each row is 1
    if weights is not None:
        k = k * weights.unsqueeze(-2)  # a zero weight gives 0, never (-inf) - (-inf)
    return (k @ y) / k.sum(-1, keepdim=True).clamp_min(1e-30)


def mean_shift_field(x, y_pos, y_neg=None, temperature=0.05, kernel="laplace", neg_weights=None, mask_self=None):
    """The one-sided mean-shift field of [1] Eq. 8-10, the form DriftXpress projects: V(x) = E_k[y_pos | x] -
    E_k[y_neg | x], each a row-normalised kernel barycentre; conventions as drift_field. Anti-symmetric: swapping
    positives and negatives flips V, and V = 0 when they are equal."""
    _check_points(x, y_pos, y_neg, neg_weights)
    with torch.no_grad(), torch.autocast(x.device.type, enabled=False):
        x, y_pos = _fp32(x), _fp32(y_pos)
        repulsion = _repulsion(x, y_neg, temperature, kernel, neg_weights, mask_self)
        return _barycentre(log_kernel(x, y_pos, temperature, kernel), y_pos) - repulsion


def _repulsion(x, y_neg, temperature, kernel, neg_weights, mask_self):
    """b_neg(x): the kernel barycentre of the negatives (resolved by _negatives), own column masked when it is one."""
    x, y_neg, neg_weights = _fp32(x), _fp32(y_neg), _fp32(neg_weights)
    y_neg, mask_self = _negatives(x, y_neg, mask_self, neg_weights)
    log_k = log_kernel(x, y_neg, temperature, kernel)  # (..., N, Nn)
    if mask_self:  # a query never sees itself as a negative
        log_k[..., :, :x.shape[-2]].diagonal(dim1=-2, dim2=-1).fill_(-math.inf)
    return _barycentre(log_k, y_neg, neg_weights)


def field_fidelity(v_approx, v_exact):
    """How close an approximate field is to the exact one: mean cosine over queries, relative L2 error
    ||V^ - V||_F / ||V||_F, and target MSE mean_i ||V^_i - V_i||^2 / D (the loss the error would add)."""
    a, b = v_approx.detach().double(), v_exact.detach().double()
    if a.shape != b.shape:
        raise ValueError(f"fields have different shapes {tuple(a.shape)} and {tuple(b.shape)}")
    a, b = a.reshape(-1, a.shape[-1]), b.reshape(-1, b.shape[-1])
    cos = F.cosine_similarity(a, b, dim=-1, eps=1e-30).mean()
    rel = (a - b).norm() / b.norm().clamp_min(1e-300)
    mse = (a - b).square().sum(-1).mean() / a.shape[-1]
    return {"cos": cos.item(), "rel_l2": rel.item(), "target_mse": mse.item()}


# ----------------------------------------------------------------------------------------------------------
# landmarks and the projected (Nystrom) field of DriftXpress [2]

def _select_indices(y, m, strategy, generator):
    """Indices of m distinct rows of y [n, D] chosen by one strategy."""
    n = y.shape[0]
    first = torch.randperm(n, generator=generator)[:m].to(y.device)
    if strategy == "random":
        return first
    # kcenter: greedy farthest point. kmeans: k-means++ seeds (each drawn with probability ~ squared distance to those
    # so far), Lloyd's iterations, then each centroid snapped to its nearest unused real sample
    chosen = [first[0]]
    gap = pairwise_distance(y, y[first[:1]]).squeeze(-1)  # (n,) distance to the nearest chosen sample
    for _ in range(m - 1):
        if strategy == "kcenter":
            chosen.append(gap.argmax())
        else:
            sq = gap.square()
            weights = sq.cpu().double() if sq.sum() > 0 else torch.ones(n, dtype=torch.float64)
            chosen.append(torch.multinomial(weights, 1, generator=generator)[0].to(y.device))
        gap = torch.minimum(gap, pairwise_distance(y, y[chosen[-1]][None]).squeeze(-1))
    if strategy == "kcenter":
        return torch.stack(chosen)
    centroids = y[torch.stack(chosen)].clone()
    for _ in range(25):
        assign = pairwise_distance(y, centroids).argmin(-1)  # (n,)
        sums = torch.zeros_like(centroids).index_add_(0, assign, y)
        counts = torch.bincount(assign, minlength=m).unsqueeze(-1)
        moved = torch.where(counts > 0, sums / counts.clamp_min(1), centroids)  # empty clusters stay put
        if torch.equal(moved, centroids):
            break
        centroids = moved
    dist = pairwise_distance(centroids, y)  # (m, n)
    taken, chosen = torch.zeros(n, dtype=torch.bool, device=y.device), []
    for row in dist:
        i = row.masked_fill(taken, math.inf).argmin()
        taken[i] = True
        chosen.append(i)
    return torch.stack(chosen)


def select_landmarks(y, m, strategy="random", labels=None, generator=None, return_index=False):
    """Choose m landmarks among the real samples y [n, D] ("random", "kmeans" or "kcenter"); with labels [n] (classes
    0..K-1), m per class, as [K, m, D]. Landmarks are always real samples, so a landmark's own sample pins the projected
    density near it. generator: a CPU torch.Generator; return_index: also return their indices into y."""
    if strategy not in ("random", "kmeans", "kcenter"):
        raise ValueError(f"unknown landmark strategy {strategy!r}; choose random, kmeans or kcenter")
    _check_points(y, names=("y",))  # a NaN would steer k-means and k-center silently
    if y.dim() != 2:
        raise ValueError(f"landmarks are chosen from samples shaped [n, D], got {tuple(y.shape)}")
    if m < 1:
        raise ValueError(f"need at least one landmark, got m={m}")
    y = y.detach().float()
    if labels is None:
        if m > y.shape[0]:
            raise ValueError(f"asked for {m} landmarks but there are only {y.shape[0]} samples")
        index = _select_indices(y, m, strategy, generator)
    else:
        labels = torch.as_tensor(labels, device=y.device)
        if labels.shape != (y.shape[0],) or labels.min() < 0:
            raise ValueError(f"labels must be [{y.shape[0]}] class indices >= 0, got {tuple(labels.shape)}")
        index = []
        for k in range(int(labels.max()) + 1):
            members = (labels == k).nonzero().squeeze(-1)
            if m > len(members):
                raise ValueError(f"asked for {m} landmarks per class but class {k} has {len(members)} samples")
            index.append(members[_select_indices(y[members], m, strategy, generator)])
        index = torch.stack(index)  # (K, m)
    return (y[index], index) if return_index else y[index]


def _check_classes(name, classes, n, per, landmarks):
    """Class indices [n] in [0, K) of per-class landmarks [..., K, M, D]: one out of range picks another class."""
    c, k = torch.as_tensor(classes, device=landmarks.device), landmarks.shape[-3] if landmarks.dim() > 2 else 0
    if c.shape != (n,) or c.is_floating_point() or n == 0 or not 0 <= c.min() <= c.max() < k:
        raise ValueError(f"{name} must be {n} class indices (one per {per}) in [0, {k}), K from landmarks [..., K, M, "
                         f"D]; got {tuple(c.shape)} with values {c.unique().tolist()[:8]}")
    return c


class NystromField:
    """The projected field of DriftXpress [2]. Landmarks U [..., M, D] (real samples); W = k(U, U);
    phi(x) = k(x, U) (W + ridge I)^(-1/2). Attraction against ALL positives through cached sums s = sum_j phi(y_j) [M]
    and S = sum_j phi(y_j) y_j^T [M, D]: b_pos(x) = phi(x)^T S / phi(x)^T s, O(N M D) a step whatever the number of
    positives. The field is the one-sided mean shift b_pos - b_neg with exact repulsion over the negatives, as the
    authors do, for stability. Leading dims of the landmarks are independent fields; fit(..., labels): one per class."""

    def __init__(self, landmarks, temperature=0.05, ridge=1e-4, kernel="laplace", folded=True, min_density=1e-3):
        _check_points(landmarks, names=("landmarks",))  # the temperature and kernel are checked by log_kernel below
        if not 0 <= ridge < math.inf:
            raise ValueError(f"ridge must be >= 0 and finite (e.g. 1e-4), got {ridge}")
        self.landmarks, self.min_density = landmarks.detach().float(), min_density
        self.temperature, self.ridge, self.kernel, self.folded = temperature, ridge, kernel, folded
        # (W + ridge I)^(-1/2) by eigendecomposition in float64; W is PSD, so clamping the eigenvalues at the
        # ridge only removes rounding noise (and keeps the inverse square root finite when ridge = 0)
        u = self.landmarks.double()
        w = log_kernel(u, u, temperature, kernel).exp_()  # (..., M, M)
        evals, evecs = torch.linalg.eigh(w + ridge * torch.eye(w.shape[-1], dtype=w.dtype, device=w.device))
        evals = evals.clamp_min(max(ridge, 1e-12 * float(evals.max())))
        self.w_inv_sqrt = (evecs * evals.rsqrt().unsqueeze(-2)) @ evecs.mT  # (..., M, M) float64
        self.u_centred = _centred(self.landmarks)  # for the distances of every step (float32 queries)
        self.s, self.S, self.count = None, None, 0

    def _kernel_rows(self, x, u, u_centred=None):
        """k(x, U) [..., N, M] with each row divided by its largest entry, and that row's log shift [..., N, 1].
        The shift cancels in every ratio, so far-away queries and small temperatures never give 0/0."""
        log_k = log_kernel(x, u.to(x.dtype), self.temperature, self.kernel, u_centred)
        shift = log_k.amax(-1, keepdim=True)
        return (log_k - shift).exp_(), shift

    def features(self, x, shift=False):
        """phi(x) [..., N, M]; shift=True: each row divided by its largest kernel value (see _kernel_rows)."""
        k, log_shift = self._kernel_rows(x, self.landmarks)
        phi = k @ self.w_inv_sqrt.to(x.dtype)
        return phi if shift else phi * log_shift.exp()

    def fit(self, y_pos, labels=None, all_reduce=False, chunk_size=4096):
        """Build the summaries over all positives, in float64 and in chunks; returns self. y_pos: a tensor [..., n, D]
        or an iterable of chunks (tensors, or (tensor, labels) pairs). With labels [n], landmarks are per class
        [..., K, M, D] and each sample feeds its own class. Sums add up, so shards can be fitted apart:
        all_reduce=True sums them over the processes of torch.distributed."""
        if torch.is_tensor(y_pos):
            chunks = [(y_pos[..., i:i + chunk_size, :], None if labels is None else labels[i:i + chunk_size])
                      for i in range(0, y_pos.shape[-2], chunk_size)] or [(y_pos, labels)]
        else:
            chunks = (c if isinstance(c, (tuple, list)) else (c, labels) for c in y_pos)
        u = self.landmarks
        self.s = torch.zeros(u.shape[:-1], dtype=torch.float64, device=u.device)  # (..., M)
        self.S, self.count = torch.zeros(u.shape, dtype=torch.float64, device=u.device), 0  # (..., M, D)

        def accumulate(y, u, s, S):  # raw kernel sums into the views s, S; (W + ridge I)^(-1/2) comes at the end
            k = log_kernel(y, u.double(), self.temperature, self.kernel).exp_()  # (..., n, M)
            s += k.sum(-2)
            S += k.mT @ y

        for y, lab in chunks:
            _check_points(u[..., :1, :], y, names=("landmarks", "y_pos"))
            y = y.detach().to(u.device, torch.float64)
            self.count += y.shape[-2]
            if lab is None:
                accumulate(y, u, self.s, self.S)
                continue
            lab = _check_classes("labels", lab, y.shape[-2], "sample", u)
            for k in lab.unique().tolist():  # each sample feeds its own class's summaries
                accumulate(y[..., lab == k, :], u[..., k, :, :], self.s[..., k, :], self.S[..., k, :, :])
        if self.count == 0:
            raise ValueError("fit got no positives")
        # sum_j phi(y_j) = (W + ridge I)^(-1/2) sum_j k(U, y_j): one product at the end, O(n M D) instead of O(n M^2)
        self.s, self.S = (self.w_inv_sqrt @ self.s.unsqueeze(-1)).squeeze(-1), self.w_inv_sqrt @ self.S
        if all_reduce:
            import torch.distributed as dist
            for t in (self.s, self.S):
                dist.all_reduce(t)
        # the folded form: (W + ridge I)^(-1/2) [S, s], so that a step is one product with k(x, U)
        self.folded_summaries = (self.w_inv_sqrt @ torch.cat([self.S, self.s.unsqueeze(-1)], -1)).float()
        return self

    def _pick(self, t, classes):
        return t if classes is None else t.index_select(t.dim() - 3, torch.as_tensor(classes, device=t.device))

    def _covers(self, classes):
        """Whether classes [K'] name every class of the landmarks exactly once (a permutation of 0..K-1)."""
        k = self.landmarks.shape[-3]
        return len(classes) == k and bool((torch.bincount(classes, minlength=k) == 1).all())

    def attraction(self, x, classes=None):
        """b_pos(x) = phi(x)^T S / phi(x)^T s, the projected barycentre of all positives. x [..., N, D];
        with classes [K'], x is [..., K', N, D] and row k of it is attracted to class classes[k]."""
        if self.s is None:
            raise RuntimeError("NystromField has no summaries yet: call .fit(y_pos) first")
        _check_points(self.landmarks[..., :1, :], x, names=("landmarks", "x"))
        if classes is not None:
            n = x.shape[-3] if x.dim() > 2 else 0
            classes = _check_classes("classes", classes, n, "field of x [..., K', N, D]", self.landmarks)
            # each class once (a class-balanced batch): reorder the few queries, not the many landmarks and summaries
            if self._covers(classes):
                dim = x.dim() - 3
                return self._attraction(x.detach().index_select(dim, classes.argsort()), None).index_select(dim, classes)
        return self._attraction(x, classes)

    def _attraction(self, x, classes):
        """attraction() on checked inputs."""
        with torch.no_grad(), torch.autocast(x.device.type, enabled=False):
            x = _fp32(x)  # float32, or float64 for float64 queries as the other fields
            u = self._pick(self.landmarks, classes).to(x.dtype)
            own = classes is None and x.dtype == torch.float32  # the landmarks as they are: centred at __init__
            k, _ = self._kernel_rows(x, u, self.u_centred if own else None)  # (..., N, M), a row's largest weight is 1
            if self.folded and x.dtype == torch.float32:
                out = k @ self._pick(self.folded_summaries, classes)  # (..., N, D+1)
                num, den = out[..., :-1], out[..., -1:]
            else:  # unfolded, or float64 queries: from the float64 summaries
                phi = k @ self._pick(self.w_inv_sqrt, classes).to(x.dtype)  # (..., N, M)
                num, den = (phi @ self._pick(t, classes).to(x.dtype) for t in (self.S, self.s.unsqueeze(-1)))
            # phi^T s ~ sum_j k(x, y_j) / max_m k(x, u_m) is about 1 or more near data, but no true density: where
            # landmarks are sparse it can near 0 or go negative, so there the landmarks' own barycentre stands in
            ok = den > self.min_density
            b_pos = num / torch.where(ok, den, 1.0)
            if not ok.all():  # the fallback costs a third product: only pay for it when a row needs it
                b_pos = torch.where(ok, b_pos, (k @ u) / k.sum(-1, keepdim=True))
            return b_pos

    def __call__(self, x, y_neg=None, classes=None, neg_weights=None, mask_self=None):
        """The projected field V(x) = b_pos(x) - b_neg(x); y_neg=None means the queries repel each other."""
        b_pos = self.attraction(x, classes)
        _check_points(x, None, y_neg, neg_weights)
        with torch.no_grad(), torch.autocast(x.device.type, enabled=False):
            return b_pos - _repulsion(x, y_neg, self.temperature, self.kernel, neg_weights, mask_self)


# ----------------------------------------------------------------------------------------------------------
# normalisation and loss [1] A.6

def feature_scale(x, y=None, weights=None, mask_self=False):
    """The feature scale S = (mean distance from the queries x [..., N, C] to the points y [..., M, C]) / sqrt(C),
    shared over all leading dims (all locations of a feature map), without gradient. Features f/S then sit at mean
    distance sqrt(C), where a temperature T acts as T * sqrt(C). weights [..., M] weight the columns (CFG); mask_self:
    the first N columns of y are x itself and the self-distances are left out."""
    _check_points(x, None, y, weights, names=("x", None, "y"))
    with torch.no_grad(), torch.autocast(x.device.type, enabled=False):
        x = _fp32(x)
        y, mask_self = (x, True) if y is None else (_fp32(y), mask_self)
        dist = pairwise_distance(x, y)  # (..., N, M)
        w = torch.ones_like(dist) if weights is None else _fp32(weights).unsqueeze(-2).expand_as(dist).clone()
        if mask_self:
            w[..., :, :x.shape[-2]].diagonal(dim1=-2, dim2=-1).zero_()
        total = w.sum()
        if not _trusted() and not total > 0:  # inside drift_loss the positives are columns of weight 1
            raise ValueError("feature_scale has no pair of points of positive weight to measure: give it >= 2 points")
        return ((dist * w).sum() / total / math.sqrt(x.shape[-1])).clamp_min(1e-12)


def build_nystrom_fields(y, landmarks, temperatures, scale, labels=None, ridge=1e-4, kernel="laplace",
                         all_reduce=False, chunk_size=4096):
    """One fitted NystromField per temperature, in the normalised units drift_loss works in: points y/scale,
    temperature T * sqrt(C). y [..., n, C] may live on the CPU; chunks move to the landmarks' device."""
    c = y.shape[-1]
    chunks = lambda: ((y[..., i:i + chunk_size, :].to(landmarks.device) / scale,
                       None if labels is None else labels[i:i + chunk_size]) for i in range(0, y.shape[-2], chunk_size))
    return [NystromField(landmarks / scale, t * math.sqrt(c), ridge, kernel).fit(chunks(), all_reduce=all_reduce)
            for t in temperatures]


def _check_drift_inputs(x, y_pos, y_neg, temperatures, field, nystrom, neg_weights, mask_self):
    """What drift_loss and normalised_drift refuse up front: bad settings, bad points, unbroadcastable dims."""
    if field not in ("exact", "nystrom"):
        raise ValueError(f"unknown field {field!r}; choose exact or nystrom")
    if (field == "exact") != (y_pos is not None):
        raise ValueError("field='exact' needs the positives y_pos; field='nystrom' has its own: pass y_pos=None")
    if isinstance(temperatures, (int, float)) or len(temperatures) == 0:
        raise ValueError(f"temperatures must be a non-empty sequence such as (0.02, 0.05, 0.2), got {temperatures}")
    _check_temperature(*temperatures)
    if field == "nystrom" and (nystrom is None or len(nystrom) != len(temperatures)):
        raise ValueError("field='nystrom' needs one fitted NystromField per temperature (build_nystrom_fields)")
    _check_points(x, y_pos, y_neg, neg_weights)
    if field == "nystrom" and any(f.landmarks.shape[-1] != x.shape[-1] for f in nystrom):
        raise ValueError(f"x has dimension {x.shape[-1]} but the NystromFields' landmarks "
                         f"{nystrom[0].landmarks.shape[-1]}: they must match")
    for name, t, d in (("y_pos", y_pos, 2), ("y_neg", y_neg, 2), ("neg_weights", neg_weights, 1)):
        lead = () if t is None else t.shape[:-d]  # must broadcast to x's leading dims: each 1 or equal
        if len(lead) > x.dim() - 2 or any(a not in (1, b) for a, b in zip(lead[::-1], x.shape[-3::-1])):
            raise ValueError(f"{name} has leading dims {tuple(lead)}, x {tuple(x.shape[:-2])}: each must be 1 or equal")
    _negatives(x, y_neg, mask_self, neg_weights)  # every query has a negative of positive weight


def normalised_drift(x, y_pos=None, y_neg=None, temperatures=(0.02, 0.05, 0.2), field="exact", nystrom=None,
                     neg_weights=None, mask_self=None, classes=None, affinity_floor=0.0):
    """The summed drift of [1] A.6 in normalised units (x, y_pos, y_neg already divided by the scale S):
    V = sum_T V_T / rms(V_T), with V_T the field at temperature T * sqrt(C) and rms = sqrt(E||V_T||^2 / C) over the
    batch. field="exact": Algorithm 2 against y_pos. field="nystrom": `nystrom` is a list of NystromField, one per
    temperature (build_nystrom_fields). Returns (V [..., N, C], raw RMS per temperature [len(T)])."""
    _check_drift_inputs(x, y_pos, y_neg, temperatures, field, nystrom, neg_weights, mask_self)
    c = x.shape[-1]
    v_total, raw_norms = torch.zeros_like(_fp32(x)), []
    for i, t in enumerate(temperatures):
        t_eff = t * math.sqrt(c)
        if field == "nystrom" and not math.isclose(nystrom[i].temperature, t_eff, rel_tol=1e-5):
            raise ValueError(f"NystromField {i} has temperature {nystrom[i].temperature:g}, expected "
                             f"{t_eff:g} (= {t} * sqrt({c})): build it with build_nystrom_fields")
        with _inputs_checked():
            if field == "exact":
                v = drift_field(x, y_pos, y_neg, t_eff, neg_weights, mask_self, affinity_floor=affinity_floor)
            else:
                v = nystrom[i](x, y_neg, classes, neg_weights, mask_self)
        rms = v.square().mean().sqrt()  # sqrt(E ||V||^2 / C) over the batch
        raw_norms.append(rms)
        v_total += v / rms.clamp_min(1e-12)
    return v_total, torch.stack(raw_norms)


def drift_loss(x, y_pos=None, y_neg=None, temperatures=(0.02, 0.05, 0.2), field="exact", nystrom=None,
               neg_weights=None, mask_self=None, scale=None, classes=None, affinity_floor=0.0):
    """The drifting loss of [1] with the normalisations of A.6, for generated features x [..., N, C] (with grad):
    1. S = feature_scale (stop-grad), shared by the leading dims; features become x/S.
    2. V = normalised_drift(x/S, ...): per temperature the field at T * sqrt(C), divided by its batch RMS, summed.
    3. loss = MSE(x/S, stopgrad(x/S + V)), whose gradient w.r.t. x/S is -2V / numel.
    field="nystrom" needs `scale`: the one the NystromFields were built with (their summaries are fixed, so the scale
    must be too); field="exact" computes it from the batch when not given. Returns (loss, stats)."""
    _check_drift_inputs(x, y_pos, y_neg, temperatures, field, nystrom, neg_weights, mask_self)
    if scale is None:
        if field != "exact":
            raise ValueError("drift_loss needs `scale` for field='nystrom': the one its NystromFields were built with")
        negatives = x if y_neg is None else y_neg  # mean distance from the queries to every column the kernel sees
        lead = torch.broadcast_shapes(negatives.shape[:-2], y_pos.shape[:-2])
        columns = torch.cat([negatives.expand(*lead, *negatives.shape[-2:]), y_pos.expand(*lead, *y_pos.shape[-2:])], -2)
        w = None if neg_weights is None else torch.cat([neg_weights.expand(*lead, negatives.shape[-2]),
                                                        neg_weights.new_ones(*lead, y_pos.shape[-2])], -1)
        with _inputs_checked():
            scale = feature_scale(x, columns, w, mask_self=y_neg is None or bool(mask_self)).float()
    else:
        scale = torch.as_tensor(scale, dtype=torch.float32, device=x.device)
        if not (torch.isfinite(scale).all() and (scale > 0).all()):
            raise ValueError(f"scale must be positive and finite (feature_scale gives one), got {scale}")
    x_n = x.float() / scale  # (..., N, C), carries the gradient
    y_pos_n, y_neg_n = (None if y is None else y.detach().float() / scale for y in (y_pos, y_neg))
    with _inputs_checked():
        v, raw_norms = normalised_drift(x_n, y_pos_n, y_neg_n, temperatures, field, nystrom, neg_weights,
                                        mask_self, classes, affinity_floor)
    return F.mse_loss(x_n, (x_n + v).detach()), {"drift_norm": raw_norms.mean(), "scale": scale}


# ----------------------------------------------------------------------------------------------------------
# encoder wrapper [1] A.5: a frozen network, features at several scales and locations

def patch_statistics(fmap, patch=0, eps=1e-6):
    """Per-channel mean and std of fmap [N, C, H, W] over non-overlapping patch x patch windows (0: the whole
    map), each shaped [locations, N, C]. std = sqrt(var + eps): the eps keeps gradients finite where a
    feature is constant (var = 0), which sqrt(var) + eps would not."""
    fmap = fmap.float()
    pool = (lambda t: t.mean((2, 3), keepdim=True)) if patch == 0 else (lambda t: F.avg_pool2d(t, patch))
    mean = pool(fmap)  # (N, C, h, w)
    std = (pool(fmap.square()) - mean.square()).clamp_min(0).add(eps).sqrt()
    return mean.flatten(2).permute(2, 0, 1), std.flatten(2).permute(2, 0, 1)  # (h*w, N, C) each


def feature_groups(fmaps, image, patches=(2, 4)):
    """The feature groups of [1] A.5, each [locations, N, C] (one drift problem per location): for every
    map its per-location vectors, per-channel mean and std over the map and over 2x2 and 4x4 patches, and
    the raw input flattened ("pixel")."""
    groups = {}
    for name, fmap in fmaps.items():  # fmap (N, C, H, W)
        groups[f"{name}.loc"] = fmap.flatten(2).permute(2, 0, 1)  # (H*W, N, C)
        for patch in (p for p in (0, *patches) if p <= min(fmap.shape[-2:])):  # patches no larger than the map
            groups[f"{name}.mean{patch or ''}"], groups[f"{name}.std{patch or ''}"] = patch_statistics(fmap, patch)
    groups["pixel"] = image.flatten(1).unsqueeze(0)  # (1, N, C*H*W)
    return groups


def edge_energy(x):
    """|central differences| of x [N, C, H, W] in 4 directions (across columns, rows and both diagonals), at
    full size and on 2x2 means, each [N, 4 C, H, W]: how much edge a place has in each direction, not where
    it sits, so a kernel mean keeps stripes that shifted copies would average away (BENCHMARKS.md §5p)."""
    k = torch.tensor([[0, 0, 0, -1, 0, 1, 0, 0, 0], [0, -1, 0, 0, 0, 0, 0, 1, 0], [-1, 0, 0, 0, 0, 0, 0, 0, 1],
                      [0, 0, -1, 0, 0, 0, 1, 0, 0]], dtype=x.dtype, device=x.device).view(4, 1, 3, 3) / 2
    diff = lambda t: F.conv2d(t, k.repeat(t.shape[1], 1, 1, 1), padding=1, groups=t.shape[1]).abs()
    return diff(x), F.interpolate(diff(F.avg_pool2d(x, 2)), size=x.shape[-2:], mode="nearest")


class PixelBackbone(nn.Module):
    """No network: the image regrouped into 4x4 pixel blocks (space to depth), so that a location is a small
    patch and the patch statistics cover 8x8 and 16x16 pixel regions; where both sides are multiples of 7
    (28x28 images), also into 7x7 blocks ("x7"), a 4x4 grid of larger parts; and each 4x4 block's mean edge
    energy ("e4": 8 channels a colour channel, edge_energy's two scales)."""

    def forward(self, x):
        maps = {"x4": F.pixel_unshuffle(x, 4), "e4": F.avg_pool2d(torch.cat(edge_energy(x), 1), 4)}  # (N, 16 C | 8 C, H/4, W/4)
        if x.shape[-2] % 7 == 0 and x.shape[-1] % 7 == 0:
            maps["x7"] = F.pixel_unshuffle(x, 7)  # (N, 49 C, H/7, W/7)
        return maps


class ResBlock(nn.Module):
    def __init__(self, c_in, c_out, stride=1):
        super().__init__()
        self.conv1, self.norm1 = nn.Conv2d(c_in, c_out, 3, stride, 1), nn.GroupNorm(8, c_out)
        self.conv2, self.norm2 = nn.Conv2d(c_out, c_out, 3, 1, 1), nn.GroupNorm(8, c_out)
        self.skip = nn.Identity() if stride == 1 and c_in == c_out else nn.Conv2d(c_in, c_out, 1, stride)

    def forward(self, x):
        h = F.gelu(self.norm1(self.conv1(x)))
        return F.gelu(self.skip(x) + self.norm2(self.conv2(h)))


class SmallResNet(nn.Module):
    """The encoder this project trains itself, as a masked autoencoder like [1]'s (train.py --stage encoder):
    four stages of two residual blocks at strides 1, 2, 4, 8; the last three are the feature maps."""

    def __init__(self, in_channels=3, widths=(32, 64, 128, 256)):
        super().__init__()
        self.config = {"in_channels": in_channels, "widths": list(widths)}
        self.stem = nn.Conv2d(in_channels, widths[0], 3, 1, 1)
        self.stages = nn.ModuleList(nn.Sequential(ResBlock(c_in, c_out, 1 if i == 0 else 2), ResBlock(c_out, c_out))
                                    for i, (c_in, c_out) in enumerate(zip(widths[:1] + widths[:-1], widths)))

    def forward(self, x):
        h, maps = self.stem(x), {}
        for i, stage in enumerate(self.stages):
            h = maps[f"stage{i + 1}"] = stage(h)
        return {k: v for k, v in maps.items() if k != "stage1"}


class MAEDecoder(nn.Module):
    """Predicts the pixels from SmallResNet's deepest map; used only to train the encoder."""

    def __init__(self, out_channels, widths=(32, 64, 128, 256)):
        super().__init__()
        layers = []
        for c_in, c_out in zip(widths[::-1], widths[::-1][1:]):
            layers += [nn.Upsample(scale_factor=2), nn.Conv2d(c_in, c_out, 3, 1, 1), nn.GELU()]
        self.net = nn.Sequential(*layers, nn.Conv2d(widths[0], out_channels, 3, 1, 1))

    def forward(self, deepest, size):
        return F.interpolate(self.net(deepest), size=size, mode="bilinear", align_corners=False)


def imagenet_normalised(x):
    """[-1, 1] grey or RGB images -> RGB normalised by ImageNet's channel means and standard deviations."""
    mean, std = x.new_tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1), x.new_tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)
    return ((x.expand(-1, 3, -1, -1) + 1) / 2 - mean) / std


class TorchvisionResNet(nn.Module):
    """A torchvision ResNet (ImageNet weights) tapped after each of its four stages."""

    def __init__(self, name, weights=None):
        super().__init__()
        import torchvision
        if weights is None:  # torchvision's own weights API: downloads once into the torch cache
            try:
                self.net = torchvision.models.get_model(name, weights="DEFAULT")
            except Exception as e:
                raise ValueError(f"could not get ImageNet weights for {name} ({type(e).__name__}: {e}); when "
                                 f"offline, pass a local state-dict file with --encoder-weights") from None
        else:
            self.net = torchvision.models.get_model(name, weights=None)
            self.net.load_state_dict(torch.load(weights, map_location="cpu", weights_only=True))

    def forward(self, x):
        x, n = imagenet_normalised(x), self.net
        h, maps = n.maxpool(n.relu(n.bn1(n.conv1(x)))), {}
        for i in range(1, 5):
            h = maps[f"layer{i}"] = getattr(n, f"layer{i}")(h)
        return maps


class DINOv2(nn.Module):
    """DINOv2 ViT through torch.hub (online once), tapped at its last four blocks as [N, C, h, w] maps."""

    def __init__(self, name, weights=None):
        super().__init__()
        try:
            self.net = torch.hub.load("facebookresearch/dinov2", name, pretrained=weights is None)
            if weights is not None:
                self.net.load_state_dict(torch.load(weights, map_location="cpu", weights_only=True))
        except Exception as e:
            raise ValueError(f"could not load {name} through torch.hub ({type(e).__name__}: {e}); it needs the "
                             f"network once, or its hub cache") from None

    def forward(self, x):
        maps = self.net.get_intermediate_layers(imagenet_normalised(x), n=4, reshape=True)
        return {f"block{i}": m for i, m in enumerate(maps)}


def _sha256(path):
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


class Encoder(nn.Module):
    """The frozen feature network of [1] A.5: images [N, C, H, W] in [-1, 1] -> {group: [locations, N, C]}. Its weights
    never change (requires_grad False, eval mode), but gradients flow through it to the generator. name: a key of
    ENCODERS; weights: a local weights file (needed for "mae"); resolution: the size images are resized to before the
    network (None: as they come; DINOv2 needs a multiple of 14)."""

    def __init__(self, name="pixel", weights=None, in_channels=3, resolution=None, patches=(2, 4)):
        super().__init__()
        if name not in ENCODERS:
            raise ValueError(f"unknown encoder {name!r}; choose one of {', '.join(ENCODERS)}")
        if weights is not None and not os.path.isfile(weights):
            raise ValueError(f"encoder weights file {weights!r} does not exist")
        self.net = ENCODERS[name](in_channels, weights)
        self.resolution, self.patches = resolution, tuple(patches)
        self.identity = {"name": name, "weights": weights, "sha256": weights and _sha256(weights),
                         "resolution": resolution, "patches": list(patches)}
        self.requires_grad_(False).eval()

    def train(self, mode=True):
        return super().train(False)  # frozen: normalisation layers keep their statistics

    def forward(self, images):
        x = images
        if self.resolution is not None and tuple(x.shape[-2:]) != (self.resolution,) * 2:
            x = F.interpolate(x, size=(self.resolution,) * 2, mode="bilinear", align_corners=False)
        return feature_groups(self.net(x), images, self.patches)


def _load_mae(in_channels, weights):
    if weights is None:
        raise ValueError("the mae encoder needs its weights file: train one with `python train.py --stage encoder` "
                         "and pass --encoder-weights out/encoder.pt")
    saved = torch.load(weights, map_location="cpu", weights_only=True)
    if not isinstance(saved, dict) or "encoder" not in saved:
        raise ValueError(f"{weights} is not an encoder file written by train.py --stage encoder")
    net = SmallResNet(**saved["config"])
    if net.config["in_channels"] != in_channels:
        raise ValueError(f"encoder {weights} takes {net.config['in_channels']} channels, the images have {in_channels}")
    net.load_state_dict(saved["encoder"])
    return net


ENCODERS = {
    "pixel": lambda in_channels, weights: PixelBackbone(),
    "mae": _load_mae,
    "resnet18": lambda in_channels, weights: TorchvisionResNet("resnet18", weights),
    "resnet50": lambda in_channels, weights: TorchvisionResNet("resnet50", weights),
    "dinov2_vits14": lambda in_channels, weights: DINOv2("dinov2_vits14", weights),
    "dinov2_vitb14": lambda in_channels, weights: DINOv2("dinov2_vitb14", weights),
}


# ----------------------------------------------------------------------------------------------------------
# generator: a compact DiT with adaLN-zero [1] A.2

class BlackFloor(torch.autograd.Function):
    """max(x, -1): below black is black, and a pixel below it gets no gradient, so a background pixel need only go
    below black. Only a sample whose every pixel is below black, which max could never bring back, passes the
    gradients that would lift a pixel (g < 0). 1 to 2 of 3 MNIST seeds went there in their first 100 steps; letting
    every pixel hear its lift instead cost MNIST recall 0.59 -> 0.41 (grey halos; BENCHMARKS.md §5s)."""

    @staticmethod
    def forward(ctx, x):
        below = x < -1
        ctx.save_for_backward(below)
        return x.masked_fill(below, -1.0)

    @staticmethod
    def backward(ctx, g):
        (below,) = ctx.saved_tensors
        dead = below.flatten(1).all(1).view((-1,) + (1,) * (g.dim() - 1))  # samples wholly below black
        return g.masked_fill(below & ~(dead & (g < 0)), 0.0)


def modulate(x, shift, scale):
    return x * (1 + scale.unsqueeze(1)) + shift.unsqueeze(1)  # (N, T, D)


def scalar_embedding(value, dim, max_period=1000.0):
    """Sinusoidal features of a scalar per sample (here the CFG scale alpha): [N] -> [N, dim]."""
    freqs = torch.exp(-math.log(max_period) * torch.arange(dim // 2, device=value.device) / (dim // 2))
    args = value.float()[:, None] * 100.0 * freqs[None]
    return torch.cat([torch.cos(args), torch.sin(args)], -1)


def sincos_positions(side, dim):
    """Fixed 2-D sin-cos position embedding for a side x side token grid: [side*side, dim]."""
    freqs = 1.0 / 10000 ** (torch.arange(dim // 4, dtype=torch.float64) / (dim // 4))
    grid = torch.outer(torch.arange(side, dtype=torch.float64), freqs)  # (side, dim/4)
    rows = torch.cat([grid.sin(), grid.cos()], -1)  # (side, dim/2)
    return torch.cat([rows[:, None].expand(side, side, -1), rows[None].expand(side, side, -1)], -1).reshape(-1, dim).float()


class Block(nn.Module):
    """A DiT block: attention and MLP, each with adaLN-zero shift, scale and gate from the conditioning."""

    def __init__(self, dim, heads, mlp_ratio=4.0):
        super().__init__()
        self.heads = heads
        self.norm1, self.norm2 = nn.LayerNorm(dim, elementwise_affine=False), nn.LayerNorm(dim, elementwise_affine=False)
        self.qkv, self.proj = nn.Linear(dim, 3 * dim), nn.Linear(dim, dim)
        hidden = int(dim * mlp_ratio)
        # exact (erf) GELU, not DiT's tanh: same curve to 5e-4, a step 21% cheaper on one CPU thread (BENCHMARKS.md §5e)
        self.mlp = nn.Sequential(nn.Linear(dim, hidden), nn.GELU(), nn.Linear(hidden, dim))
        self.modulation = nn.Linear(dim, 6 * dim)  # zero-initialised by Generator

    def forward(self, x, c):
        shift1, scale1, gate1, shift2, scale2, gate2 = self.modulation(F.silu(c)).chunk(6, -1)  # (N, D) each
        n, t, d = x.shape
        q, k, v = self.qkv(modulate(self.norm1(x), shift1, scale1)).view(n, t, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        if q.device.type == "cpu" and q.dtype == torch.bfloat16:  # torch's CPU flash attention: backward 5x slower in
            h = (q @ k.transpose(-2, -1) * q.shape[-1] ** -0.5).softmax(-1).to(v.dtype) @ v  # bf16 (BENCHMARKS.md §5s)
        else:
            h = F.scaled_dot_product_attention(q, k, v)
        h = h.transpose(1, 2).reshape(n, t, d)  # (N, T, D)
        x = x + gate1.unsqueeze(1) * self.proj(h)
        return x + gate2.unsqueeze(1) * self.mlp(modulate(self.norm2(x), shift2, scale2))


class Generator(nn.Module):
    """The one-step generator x = f(noise, class, alpha): patchify the noise, DiT blocks conditioned by adaLN-zero on
    class embedding + CFG-scale embedding (+ the sum of random "style" token embeddings from a codebook), unpatchify;
    every block starts as the identity. out_init > 0: the output starts as a per-patch function of the noise with pixel
    RMS out_init; 0: DiT's zero output layer, where every sample starts at x = 0 with the same drift, a symmetry the
    field breaks slowly (BENCHMARKS.md §5). black_floor: output max(x, -1), for data whose background is black."""

    def __init__(self, image_size=32, channels=3, num_classes=10, patch_size=4, dim=256, depth=6, heads=4,
                 mlp_ratio=4.0, style_tokens=32, style_codebook=64, out_init=1.0, black_floor=False):
        super().__init__()
        if image_size % patch_size:
            raise ValueError(f"image size {image_size} is not a multiple of the patch size {patch_size}")
        self.image_size, self.channels, self.patch_size = image_size, channels, patch_size
        self.num_classes, self.style_tokens, self.style_codebook = num_classes, style_tokens, style_codebook
        self.black_floor = black_floor
        self.patch_embed = nn.Conv2d(channels, dim, patch_size, patch_size)  # patchify
        self.register_buffer("positions", sincos_positions(image_size // patch_size, dim), persistent=False)
        self.class_embed = nn.Embedding(num_classes, dim)
        self.cfg_embed = nn.Sequential(nn.Linear(dim, dim), nn.SiLU(), nn.Linear(dim, dim))
        self.style_embed = nn.Embedding(style_codebook, dim) if style_tokens else None
        self.blocks = nn.ModuleList(Block(dim, heads, mlp_ratio) for _ in range(depth))
        self.final_norm, self.final_modulation = nn.LayerNorm(dim, elementwise_affine=False), nn.Linear(dim, 2 * dim)
        self.out = nn.Linear(dim, patch_size * patch_size * channels)
        self.apply(lambda m: nn.init.xavier_uniform_(m.weight) if isinstance(m, nn.Linear) else None)
        for m in self.modules():
            if isinstance(m, nn.Linear) and m.bias is not None:
                nn.init.zeros_(m.bias)
        # unit-scale class embeddings (not DiT's 0.02): the class must stand out in the conditioning from step one,
        # a one-step generator gets no thousands of warm-up steps; the style tokens sum to half that scale
        nn.init.normal_(self.class_embed.weight, std=1.0)
        if self.style_embed is not None:
            nn.init.normal_(self.style_embed.weight, std=0.5 / math.sqrt(style_tokens))
        for layer in [b.modulation for b in self.blocks] + [self.final_modulation, self.out]:  # adaLN-zero
            for p in (layer.weight, layer.bias):
                nn.init.zeros_(p)
        if out_init:  # the final LayerNorm gives tokens unit mean square: weights of std out_init/sqrt(dim) give that pixel RMS
            nn.init.normal_(self.out.weight, std=out_init / math.sqrt(dim))

    def make_noise(self, n, generator=None, device="cpu"):
        """The generator's random inputs: Gaussian noise [n, C, H, W] and style token indices [n, tokens]."""
        noise = torch.randn(n, self.channels, self.image_size, self.image_size, generator=generator)
        style = torch.randint(self.style_codebook, (n, self.style_tokens), generator=generator) if self.style_tokens else None
        return noise.to(device), None if style is None else style.to(device)

    def condition(self, labels, alpha, style=None):
        """class embedding + CFG-scale embedding (+ the sum of the style token embeddings): [N, dim]"""
        c = self.class_embed(labels) + self.cfg_embed(scalar_embedding(alpha, self.class_embed.embedding_dim))
        return c if style is None else c + self.style_embed(style).sum(1)

    def forward(self, noise, labels, alpha, style=None):
        p, side = self.patch_size, self.image_size // self.patch_size
        x = self.patch_embed(noise).flatten(2).transpose(1, 2) + self.positions  # (N, T, D)
        c = self.condition(labels, alpha, style)
        for block in self.blocks:
            x = block(x, c)
        shift, scale = self.final_modulation(F.silu(c)).chunk(2, -1)
        x = self.out(modulate(self.final_norm(x), shift, scale))  # (N, T, p*p*C)
        x = x.view(-1, side, side, p, p, self.channels).permute(0, 5, 1, 3, 2, 4)  # (N, C, side, p, side, p)
        x = x.reshape(-1, self.channels, self.image_size, self.image_size)
        return BlackFloor.apply(x) if self.black_floor else x


class ConvBlock(nn.Module):
    """A residual block of two 3x3 convolutions, each after a GroupNorm with shift and scale from the conditioning."""

    def __init__(self, channels, dim):
        super().__init__()
        self.norm1, self.norm2 = nn.GroupNorm(8, channels, affine=False), nn.GroupNorm(8, channels, affine=False)
        self.conv1, self.conv2 = nn.Conv2d(channels, channels, 3, padding=1), nn.Conv2d(channels, channels, 3, padding=1)
        self.modulation = nn.Linear(dim, 4 * channels)  # zero-initialised, and conv2 too: the block starts as the identity
        for p in (self.modulation.weight, self.modulation.bias, self.conv2.weight, self.conv2.bias):
            nn.init.zeros_(p)

    def forward(self, h, c):
        shift1, scale1, shift2, scale2 = self.modulation(F.silu(c))[:, :, None, None].chunk(4, 1)
        r = self.conv1(F.silu(self.norm1(h) * (1 + scale1) + shift1))
        return h + self.conv2(F.silu(self.norm2(r) * (1 + scale2) + shift2))


class ConvGenerator(Generator):
    """The same inputs and conditioning as Generator, a small convolutional decoder instead of the DiT: the conditioning
    becomes a widths[0]-channel map at 1/2^(S-1) of the image side, each of the S stages adds the noise at its own scale
    (space to depth, a 1x1 convolution) and runs its residual blocks, and a stage doubles the side (nearest, then a 3x3
    convolution) before the next. On Fashion-MNIST it doubled the recall of a 30-minute CPU run (BENCHMARKS.md §5l)."""

    def __init__(self, image_size=28, channels=1, num_classes=10, dim=128, widths=(64, 32, 16), blocks=(2, 2, 2),
                 style_tokens=32, style_codebook=64, out_init=1.0, black_floor=False):
        scale = 2 ** (len(widths) - 1)
        if image_size % scale or any(w % 8 for w in widths):
            raise ValueError(f"image size {image_size} must be a multiple of {scale}, and widths {widths} of 8")
        super().__init__(image_size, channels, num_classes, patch_size=1, dim=dim, depth=0, style_tokens=style_tokens,
                         style_codebook=style_codebook, black_floor=black_floor)  # the conditioning; the DiT's parts go:
        del self.patch_embed, self.positions, self.blocks, self.final_norm, self.final_modulation
        self.side = image_size // scale
        self.from_c = nn.Linear(dim, widths[0] * self.side ** 2)
        self.noise_in = nn.ModuleList(nn.Conv2d(channels * (scale >> i) ** 2, w, 1) for i, w in enumerate(widths))
        self.up = nn.ModuleList(nn.Conv2d(a, b, 3, padding=1) for a, b in zip(widths, widths[1:]))
        self.stages = nn.ModuleList(nn.ModuleList(ConvBlock(w, dim) for _ in range(n)) for w, n in zip(widths, blocks))
        self.out_norm = nn.GroupNorm(8, widths[-1], affine=False)
        self.out = nn.Conv2d(widths[-1], channels, 3, padding=1)
        nn.init.zeros_(self.out.bias)  # out_init as in Generator: GroupNorm + SiLU gives E h^2 = 0.3555, 9 w inputs
        nn.init.normal_(self.out.weight, std=out_init / math.sqrt(9 * widths[-1] * 0.3555)) if out_init else \
            nn.init.zeros_(self.out.weight)

    def forward(self, noise, labels, alpha, style=None):
        c = self.condition(labels, alpha, style)
        h = self.from_c(c).view(len(c), -1, self.side, self.side)
        for i, stage in enumerate(self.stages):
            if i:
                h = self.up[i - 1](F.interpolate(h, scale_factor=2, mode="nearest"))
            h = h + self.noise_in[i](F.pixel_unshuffle(noise, self.image_size // h.shape[-1]))
            for block in stage:
                h = block(h, c)
        x = self.out(F.silu(self.out_norm(h)))
        return BlackFloor.apply(x) if self.black_floor else x


# ----------------------------------------------------------------------------------------------------------
# registries

GENERATORS = {  # DiT sizes and the ConvGenerator's; patch size, image size, channels and classes come from the data
    "tiny": dict(dim=128, depth=4, heads=4),
    # ConvGenerator, for 28x28 and 32x32 images; two blocks at 14x14 and 28x28, not one: better FID (BENCHMARKS.md §5m)
    "conv": dict(dim=128, widths=(64, 32, 16), blocks=(2, 2, 2)),
    "small": dict(dim=384, depth=12, heads=6),
    "base": dict(dim=768, depth=12, heads=12),
}
