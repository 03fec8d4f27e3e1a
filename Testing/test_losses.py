"""Tests of FCMSegmentationLib.losses against slow, loop-based references and known optima."""
import itertools

import numpy as np
import pytest
import torch

from FCMSegmentationLib.errors import InputError
from FCMSegmentationLib.losses import (
    ACWELoss, RFCMLoss, SemiSupervisedFCMLoss, acwe_loss, fcm_centroids, fcm_label_loss, rfcm_loss,
    rfcm_terms, semi_supervised_loss,
)

torch.set_num_threads(1)
SHAPES = {"2d": (5, 6), "3d": (3, 4, 5)}


def random_case(spatial, n=2, k=3, c=2, seed=0, dtype=torch.float64):
    """Softmax memberships, intensities in [0, 1], a random mask (non-empty per image), labels with gaps."""
    g = torch.Generator().manual_seed(seed)
    u = torch.randn((n, k) + spatial, generator=g, dtype=dtype).mul(2).softmax(1)
    y = torch.rand((n, c) + spatial, generator=g, dtype=dtype)
    mask = torch.rand((n,) + spatial, generator=g) < 0.7
    mask.view(n, -1)[:, 0] = True
    labels = torch.randint(-1, k, (n,) + spatial, generator=g)
    return u, y, mask, labels


# ------------------------------------------------------------------ slow references (explicit loops)


def ref_rfcm(u, y, q, beta, mask, w, eps=1e-8):
    """Per-image D and R by enumeration of voxels, classes and neighbours; mean over the batch."""
    u, y, mask = u.detach().numpy(), y.detach().numpy(), mask.numpy()
    n_img, k_cls, c_ch = u.shape[0], u.shape[1], y.shape[1]
    spatial = u.shape[2:]
    offsets = [o for o in itertools.product((-1, 0, 1), repeat=len(spatial)) if any(o)]
    assert len(offsets) == (8 if len(spatial) == 2 else 26)
    d_all, r_all = [], []
    for n in range(n_img):
        inside = [j for j in np.ndindex(*spatial) if mask[n][j]]
        v = np.zeros((k_cls, c_ch))
        for k in range(k_cls):
            den = sum(u[n, k][j] ** q for j in inside)
            for c in range(c_ch):
                v[k, c] = sum(u[n, k][j] ** q * y[n, c][j] for j in inside) / (den + eps)
        d_sum = 0.0
        r_sum = 0.0
        for j in inside:
            for k in range(k_cls):
                dist = sum(w[c] * (y[n, c][j] - v[k, c]) ** 2 for c in range(c_ch))
                d_sum += u[n, k][j] ** q * dist
                for o in offsets:
                    nb = tuple(a + b for a, b in zip(j, o))
                    if not all(0 <= a < s for a, s in zip(nb, spatial)) or not mask[n][nb]:
                        continue  # zero padding; neighbours outside the mask count as 0
                    for m in range(k_cls):
                        if m != k:
                            r_sum += u[n, k][j] ** q * u[n, m][nb] ** q
        d_all.append(d_sum / len(inside))
        r_all.append(r_sum / len(inside))
    d, r = float(np.mean(d_all)), float(np.mean(r_all))
    return d, r, d + beta * r


def ref_label(u, labels, q, mask=None, ignore=-1):
    u, labels = u.detach().numpy(), labels.numpy()
    total, count = 0.0, 0
    for n in range(u.shape[0]):
        for j in np.ndindex(*u.shape[2:]):
            if labels[n][j] == ignore or (mask is not None and not mask[n][j]):
                continue
            count += 1
            for k in range(u.shape[1]):
                g = 1.0 if labels[n][j] == k else 0.0
                total += u[n, k][j] ** q * (1.0 - g) ** 2
    return total / count if count else 0.0


def ref_acwe(u, y, lambda1, lambda2, mu, length, eps=1e-8):
    u, y = u.detach().numpy(), y.detach().numpy()
    spatial = u.shape[2:]
    losses = []
    for n in range(u.shape[0]):
        vox = list(np.ndindex(*spatial))
        c_in = [sum(u[n, 0][j] * y[n, c][j] for j in vox) / (sum(u[n, 0][j] for j in vox) + eps)
                for c in range(y.shape[1])]
        c_out = [sum((1 - u[n, 0][j]) * y[n, c][j] for j in vox) / (sum(1 - u[n, 0][j] for j in vox) + eps)
                 for c in range(y.shape[1])]
        total = 0.0
        for j in vox:
            for c in range(y.shape[1]):
                total += lambda1 * u[n, 0][j] * (y[n, c][j] - c_in[c]) ** 2
                total += lambda2 * (1 - u[n, 0][j]) * (y[n, c][j] - c_out[c]) ** 2
            if length == "length":
                grad2 = 0.0
                for axis in range(len(spatial)):
                    if j[axis] + 1 < spatial[axis]:
                        nxt = list(j)
                        nxt[axis] += 1
                        grad2 += (u[n, 0][tuple(nxt)] - u[n, 0][j]) ** 2
                total += mu * np.sqrt(grad2 + eps)
            elif length == "area":
                total += mu * u[n, 0][j]
        losses.append(total / len(vox))
    return float(np.mean(losses))


# ----------------------------------------------------------------------------- against references


@pytest.mark.parametrize("dim", ["2d", "3d"])
@pytest.mark.parametrize("q", [2.0, 1.5])
def test_rfcm_matches_reference(dim, q):
    u, y, mask, _ = random_case(SHAPES[dim])
    w = [1.0, 0.3]
    d, r = rfcm_terms(u, y, q=q, mask=mask, channel_weights=w)
    d_ref, r_ref, l_ref = ref_rfcm(u, y, q, 0.05, mask, w)
    assert d.item() == pytest.approx(d_ref, rel=1e-10)
    assert r.item() == pytest.approx(r_ref, rel=1e-10)
    loss = rfcm_loss(u, y, q=q, beta=0.05, mask=mask, channel_weights=w)
    assert loss.item() == pytest.approx(l_ref, rel=1e-10)


@pytest.mark.parametrize("dim", ["2d", "3d"])
def test_rfcm_without_mask_and_centroids_match_reference(dim):
    u, y, _, _ = random_case(SHAPES[dim], c=1, seed=1)
    full = torch.ones((u.shape[0],) + u.shape[2:], dtype=torch.bool)
    assert rfcm_loss(u, y, beta=0.01).item() == pytest.approx(ref_rfcm(u, y, 2.0, 0.01, full, [1.0])[2], rel=1e-10)
    v = fcm_centroids(u, y)
    uq = u.pow(2)
    for n, k in itertools.product(range(u.shape[0]), range(u.shape[1])):
        expected = float((uq[n, k] * y[n, 0]).sum() / (uq[n, k].sum() + 1e-8))
        assert v[n, k, 0].item() == pytest.approx(expected, rel=1e-12)


@pytest.mark.parametrize("dim", ["2d", "3d"])
def test_label_and_semi_match_reference(dim):
    u, y, mask, labels = random_case(SHAPES[dim], seed=2)
    assert fcm_label_loss(u, labels).item() == pytest.approx(ref_label(u, labels, 2.0), rel=1e-12)
    assert fcm_label_loss(u, labels.unsqueeze(1), q=1.5, mask=mask).item() == pytest.approx(
        ref_label(u, labels, 1.5, mask.numpy()), rel=1e-12)
    w = [0.5, 2.0]
    semi = semi_supervised_loss(u, y, labels, alpha=0.7, q=2.0, beta=0.02, mask=mask, channel_weights=w)
    expected = ref_rfcm(u, y, 2.0, 0.02, mask, w)[2] + 0.7 * ref_label(u, labels, 2.0, mask.numpy())
    assert semi.item() == pytest.approx(expected, rel=1e-10)
    module = SemiSupervisedFCMLoss(alpha=0.7, beta=0.02, channel_weights=w)
    assert module(u, y, labels, mask).item() == pytest.approx(expected, rel=1e-10)


@pytest.mark.parametrize("dim", ["2d", "3d"])
@pytest.mark.parametrize("length", ["length", "area", None])
def test_acwe_matches_reference(dim, length):
    u, y, _, _ = random_case(SHAPES[dim], k=2, seed=3)
    loss = acwe_loss(u[:, :1], y, lambda1=1.0, lambda2=2.0, mu=0.3, length=length)
    assert loss.item() == pytest.approx(ref_acwe(u[:, :1], y, 1.0, 2.0, 0.3, length), rel=1e-10)
    same = ACWELoss(1.0, 2.0, 0.3, length)(u[:, 0], y)  # (N, *spatial) form
    assert same.item() == pytest.approx(loss.item(), rel=1e-12)


# ----------------------------------------------------------------------------------------- gradients


def _logits(spatial, k=3, seed=4):
    g = torch.Generator().manual_seed(seed)
    return torch.randn((2, k) + spatial, generator=g, dtype=torch.float64).requires_grad_()


@pytest.mark.parametrize("spatial", [(3, 4), (2, 3, 3)])
def test_gradcheck(spatial):
    _, y, mask, labels = random_case(spatial, seed=5)
    y.requires_grad_()
    logits = _logits(spatial)
    w = [1.0, 0.4]
    # D is stationary in the centroids (they are its minimiser), so check their gradient directly.
    assert torch.autograd.gradcheck(lambda lg, yy: fcm_centroids(lg.softmax(1), yy, mask=mask), (logits, y))
    assert torch.autograd.gradcheck(
        lambda lg, yy: rfcm_loss(lg.softmax(1), yy, beta=0.1, mask=mask, channel_weights=w), (logits, y))
    assert torch.autograd.gradcheck(lambda lg: fcm_label_loss(lg.softmax(1), labels, q=1.5), (logits,))
    assert torch.autograd.gradcheck(
        lambda lg, yy: semi_supervised_loss(lg.softmax(1), yy, labels, 0.5, 2.0, 0.1, mask, w), (logits, y))
    fg = _logits(spatial, k=1, seed=6)
    for length in ("length", "area"):
        assert torch.autograd.gradcheck(
            lambda lg, yy: acwe_loss(torch.sigmoid(lg), yy, mu=0.2, length=length), (fg, y))


# ---------------------------------------------------------------------- classical FCM is the optimum


def classical_fcm(y, mask, w, k, q, iterations=3000):
    """Textbook FCM on the masked voxels (numpy, float64): alternate centroid and membership updates."""
    feats = y[0].reshape(y.shape[1], -1)[:, mask.reshape(-1)].T             # (P, C)
    rng = np.random.default_rng(0)
    u = rng.dirichlet(np.ones(k), size=feats.shape[0])                      # (P, K)
    for _ in range(iterations):
        uq = u ** q
        v = uq.T @ feats / uq.sum(0)[:, None]                               # (K, C)
        d = ((feats[:, None, :] - v[None]) ** 2 * w).sum(2)                 # (P, K)
        new = 1.0 / ((d[:, :, None] / d[:, None, :]) ** (1.0 / (q - 1))).sum(2)
        if np.abs(new - u).max() < 1e-14:
            break
        u = new
    return new


@pytest.mark.parametrize("q", [2.0, 1.6])
def test_fcm_fixed_point_is_stationary(q):
    """beta=0: at the classical FCM solution the gradient of D is normal to the simplex (KKT)."""
    rng = np.random.default_rng(1)
    h, wid, k = 8, 10, 3
    centres = np.array([[0.1, 0.9], [0.5, 0.2], [0.9, 0.7]])
    y = centres[rng.integers(0, k, h * wid)].T.reshape(1, 2, h, wid) + 0.08 * rng.standard_normal((1, 2, h, wid))
    mask = rng.random((h, wid)) < 0.8
    w = np.array([1.0, 0.5])
    u_in = classical_fcm(y, mask, w, k, q)
    u_full = np.full((h * wid, k), 1.0 / k)
    u_full[mask.reshape(-1)] = u_in
    u_np = u_full.T.reshape(1, k, h, wid)

    def projected_gradient(u_arr):
        u = torch.tensor(u_arr, requires_grad=True)
        data, _ = rfcm_terms(u, torch.tensor(y), q=q, mask=torch.tensor(mask)[None], channel_weights=w, eps=0.0)
        (grad,) = torch.autograd.grad(data, u)
        grad = grad[0][:, torch.tensor(mask)]                                # (K, P)
        return (grad - grad.mean(0, keepdim=True)).abs().max().item(), grad.abs().max().item()

    proj, scale = projected_gradient(u_np)
    assert proj < 1e-9 * scale
    # Control: a nearby non-optimal membership has a clearly non-zero tangential gradient.
    noisy = u_np * np.exp(0.2 * rng.standard_normal(u_np.shape))
    proj_noisy, scale_noisy = projected_gradient(noisy / noisy.sum(1, keepdims=True))
    assert proj_noisy > 1e-2 * scale_noisy


# --------------------------------------------------------------------------- optimising memberships


def _disc_image(sigma, seed, n=64, radius=18.0):
    g = torch.Generator().manual_seed(seed)
    yy, xx = torch.meshgrid(torch.arange(n), torch.arange(n), indexing="ij")
    truth = (yy - (n - 1) / 2) ** 2 + (xx - (n - 1) / 2) ** 2 < radius ** 2
    y = 0.2 + 0.6 * truth.double() + sigma * torch.randn(truth.shape, generator=g, dtype=torch.float64)
    return y[None, None].float(), truth


def _fit_dice(sigma, beta, seed=0, steps=150):
    """Optimise free logits on RFCM with Adam; Dice of the brighter cluster with the disc."""
    torch.manual_seed(seed)
    y, truth = _disc_image(sigma, seed)
    logits = (0.01 * torch.randn((1, 2) + truth.shape)).requires_grad_()
    opt = torch.optim.Adam([logits], lr=0.3)
    loss_fn = RFCMLoss(beta=beta)
    for _ in range(steps):
        opt.zero_grad()
        loss_fn(logits.softmax(1), y).backward()
        opt.step()
    u = logits.detach().softmax(1)
    bright = fcm_centroids(u, y)[0, :, 0].argmax()
    pred = u.argmax(1)[0] == bright
    return (2.0 * (pred & truth).sum() / (pred.sum() + truth.sum())).item()


def test_free_memberships_recover_disc():
    # Intensities 0.2 / 0.8 (contrast 0.6, scale ~[0, 1]); paper beta.
    assert _fit_dice(sigma=0.1, beta=0.0008) > 0.95


def test_spatial_term_helps_under_heavy_noise():
    # sigma = 0.3 is half the contrast. A crisp voxel flipped inside a crisp region raises the R sum by 16
    # (8 for itself, 1 for each neighbour) while it changes the D sum by typically < contrast^2 = 0.36, so
    # beta must be ~0.01-0.1 to matter here (0.0008 barely does). beta scales with intensity^2.
    plain = _fit_dice(sigma=0.3, beta=0.0)
    regularised = _fit_dice(sigma=0.3, beta=0.05)
    assert regularised > plain + 0.1
    assert regularised > 0.9


# ------------------------------------------------------------------------------------ edge cases


def test_empty_class_is_defined():
    u, y, mask, _ = random_case((5, 6), k=2, seed=7)
    logits = torch.log(u).requires_grad_()
    full = torch.cat([logits, torch.full_like(logits[:, :1], -1e4)], dim=1)  # class 2 gets exactly 0
    mem = full.softmax(1)
    assert (mem[:, 2] == 0).all()
    v = fcm_centroids(mem, y, mask=mask)
    assert torch.isfinite(v).all() and (v[:, 2] == 0).all()
    loss = rfcm_loss(mem, y, beta=0.01, mask=mask) + fcm_label_loss(mem, torch.full((2, 5, 6), 2))
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(logits.grad).all()


def test_empty_mask_raises():
    u, y, mask, labels = random_case((5, 6), seed=8)
    with pytest.raises(InputError, match="mask is empty"):
        rfcm_loss(u, y, mask=torch.zeros_like(mask))
    mask[1] = False  # only the second image's mask is empty
    with pytest.raises(InputError, match=r"mask is empty for image\(s\) \[1\]"):
        semi_supervised_loss(u, y, labels, mask=mask.float())


def test_unlabelled_only():
    u, y, mask, _ = random_case((3, 4, 5), seed=9)
    logits = torch.log(u).requires_grad_()
    none = torch.full((2, 3, 4, 5), -1)
    label = fcm_label_loss(logits.softmax(1), none)
    label.backward()
    assert label.item() == 0.0 and (logits.grad == 0).all()
    semi = semi_supervised_loss(u, y, none, alpha=10.0, beta=0.01, mask=mask)
    assert semi.item() == rfcm_loss(u, y, beta=0.01, mask=mask).item()
    assert semi_supervised_loss(u, y, None, beta=0.01, mask=mask).item() == semi.item()
    # labels only outside the mask count as unlabelled too
    outside = torch.where(mask, torch.tensor(-1), torch.tensor(0))
    assert fcm_label_loss(u, outside, mask=mask).item() == 0.0


def test_2d_equals_single_slice_3d():
    u, y, mask, labels = random_case((5, 6), seed=10)
    as3d = [t.unsqueeze(-3) for t in (u, y, mask, labels)]
    assert rfcm_loss(u, y, beta=0.1, mask=mask).item() == pytest.approx(
        rfcm_loss(as3d[0], as3d[1], beta=0.1, mask=as3d[2]).item(), rel=1e-12)
    assert fcm_label_loss(u, labels).item() == pytest.approx(fcm_label_loss(as3d[0], as3d[3]).item(), rel=1e-12)
    assert acwe_loss(u[:, :1], y).item() == pytest.approx(acwe_loss(as3d[0][:, :1], as3d[1]).item(), rel=1e-12)


def test_mask_forms_and_reductions():
    u, y, mask, _ = random_case((5, 6), seed=11)
    a = rfcm_loss(u, y, mask=mask, reduction="none")
    b = rfcm_loss(u, y, mask=mask.unsqueeze(1).double())
    assert a.shape == (2,) and b.item() == pytest.approx(a.mean().item(), rel=1e-12)
    assert rfcm_loss(u, y, mask=mask, reduction="sum").item() == pytest.approx(a.sum().item(), rel=1e-12)
    # values outside the mask are ignored
    y2 = torch.where(mask.unsqueeze(1), y, torch.full_like(y, 100.0))
    assert rfcm_loss(u, y2, mask=mask, reduction="none").tolist() == pytest.approx(a.tolist(), rel=1e-12)


def test_precision_and_autocast():
    u, y, mask, _ = random_case((3, 4, 5), seed=12)
    ref = rfcm_loss(u, y, beta=0.1, mask=mask)
    f32 = rfcm_loss(u.float(), y.float(), beta=0.1, mask=mask)
    assert f32.dtype == torch.float32 and f32.item() == pytest.approx(ref.item(), rel=1e-5)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        auto = rfcm_loss(u.float(), y.float(), beta=0.1, mask=mask)
        half_in = rfcm_loss(u.bfloat16(), y.float(), beta=0.1, mask=mask)
    assert auto.dtype == torch.float32 and auto.item() == pytest.approx(ref.item(), rel=1e-5)
    assert half_in.dtype == torch.float32 and half_in.item() == pytest.approx(ref.item(), rel=2e-2)


@pytest.mark.parametrize("call, match", [
    (lambda u, y, m, lab: rfcm_loss(u, y[..., :-1]), "y must have shape"),
    (lambda u, y, m, lab: rfcm_loss(u[0], y), "u must have shape"),
    (lambda u, y, m, lab: rfcm_loss(u, y, mask=m[:, :-1]), "mask must have shape"),
    (lambda u, y, m, lab: rfcm_loss(u, y, channel_weights=[1.0]), "one weight per channel"),
    (lambda u, y, m, lab: rfcm_loss(u, y, reduction="max"), "reduction"),
    (lambda u, y, m, lab: fcm_label_loss(u, lab + 1), "class indices"),
    (lambda u, y, m, lab: fcm_label_loss(u, lab.double()), "integer tensor"),
    (lambda u, y, m, lab: acwe_loss(u, y), "one foreground channel"),
    (lambda u, y, m, lab: acwe_loss(u[:, :1], y, length="perimeter"), "length must be"),
])
def test_bad_inputs(call, match):
    u, y, mask, labels = random_case((5, 6), seed=13)
    with pytest.raises(InputError, match=match):
        call(u, y, mask, labels)
