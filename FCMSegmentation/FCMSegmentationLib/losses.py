"""Fuzzy C-means losses for training segmentation networks without (or with few) labels.

Implements the losses of Chen et al., Med. Phys. 48(7) 2021 (robust FCM, FCM label loss, their sum) and
the binary active-contour-without-edges loss of Chen & Frey, MIDL 2020. See ``docs/method.md``.

Conventions (all functions):

* ``u``: memberships, shape ``(N, K, *spatial)`` with ``spatial`` = ``(H, W)`` or ``(D, H, W)``; softmax
  outputs (they sum to 1 over ``K``). Not re-normalised here.
* ``y``: intensities (features), shape ``(N, C, *spatial)``, on the same grid as ``u``.
* ``mask``: optional voxel set ``M``, shape ``(N, 1, *spatial)`` or ``(N, *spatial)``, bool or float
  (non-zero = inside). Every sum over voxels runs over ``M`` only. An image whose mask is empty raises
  :class:`InputError`.
* ``labels``: integer map ``(N, *spatial)`` or ``(N, 1, *spatial)``; ``ignore_index`` (default -1) marks
  unlabelled voxels.

Normalisation: every term is a **mean over the (masked) voxels of one image**; ``reduction`` then
combines the ``N`` per-image values (``"mean"``, ``"sum"`` or ``"none"`` -> shape ``(N,)``). The label loss
is the exception: it is a mean over the labelled voxels of the whole batch (strokes may sit on a single
image), and 0 when nothing is labelled.

Scale: the data term grows with intensity squared, the spatial term does not, so ``beta`` (and ACWE's
``mu``) only mean something at a fixed input scale. The defaults assume intensities of order [0, 1]
(the SPECT normalisation of :mod:`.preprocessing`).

Precision: computed in float64 when an input is float64, otherwise in float32 with autocast disabled
(so half / bfloat16 network outputs are safe); the result has that dtype.
"""
from typing import Optional, Sequence, Tuple, Union

import torch
import torch.nn.functional as F

from .errors import InputError

Weights = Union[None, Sequence[float], torch.Tensor]
REDUCTIONS = ("mean", "sum", "none")
LENGTH_TERMS = ("length", "area", None)

__all__ = [
    "fcm_centroids", "rfcm_terms", "rfcm_loss", "fcm_label_loss", "semi_supervised_loss", "acwe_loss",
    "RFCMLoss", "FCMLabelLoss", "SemiSupervisedFCMLoss", "ACWELoss",
]


# ----------------------------------------------------------------------------------------- helpers


def _compute_dtype(*tensors: torch.Tensor) -> torch.dtype:
    """float64 if any input is float64, else float32 (never half precision)."""
    return torch.float64 if any(t.dtype == torch.float64 for t in tensors) else torch.float32


def _check_u(u: torch.Tensor, name: str = "u") -> None:
    if not isinstance(u, torch.Tensor) or u.dim() not in (4, 5):
        shape = tuple(u.shape) if isinstance(u, torch.Tensor) else type(u).__name__
        raise InputError(f"{name} must have shape (N, K, H, W) or (N, K, D, H, W), got {shape}")
    if not u.is_floating_point():
        raise InputError(f"{name} must be a floating-point tensor, got {u.dtype}")


def _check_y(y: torch.Tensor, u: torch.Tensor) -> None:
    if not isinstance(y, torch.Tensor) or y.dim() != u.dim() or y.shape[0] != u.shape[0] \
            or y.shape[2:] != u.shape[2:]:
        got = tuple(y.shape) if isinstance(y, torch.Tensor) else type(y).__name__
        raise InputError(f"y must have shape (N, C, *spatial) = ({u.shape[0]}, C, "
                         f"{', '.join(map(str, u.shape[2:]))}) to match u, got {got}")


def _check_q(q: float) -> None:
    if not q >= 1.0:
        raise InputError(f"fuzzifier q must be >= 1 (the paper uses 2), got {q}")


def _check_reduction(reduction: str) -> None:
    if reduction not in REDUCTIONS:
        raise InputError(f"reduction must be one of {REDUCTIONS}, got {reduction!r}")


def _as_voxel_map(t: torch.Tensor, u: torch.Tensor, name: str) -> torch.Tensor:
    """Reshape a per-voxel map given as (N, *spatial) or (N, 1, *spatial) to (N, 1, *spatial)."""
    spatial = tuple(u.shape[2:])
    if t.dim() == u.dim() - 1:
        t = t.unsqueeze(1)
    if t.dim() != u.dim() or t.shape[0] != u.shape[0] or t.shape[1] != 1 or tuple(t.shape[2:]) != spatial:
        raise InputError(f"{name} must have shape (N, *spatial) or (N, 1, *spatial) with N={u.shape[0]}, "
                         f"spatial={spatial}, got {tuple(t.shape)}")
    return t


def _mask_weights(mask: Optional[torch.Tensor], u: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Mask as 0/1 float (N, 1, *spatial); all ones when ``mask`` is None. Raises if an image's mask is empty."""
    if mask is None:
        return torch.ones((u.shape[0], 1) + tuple(u.shape[2:]), dtype=dtype, device=u.device)
    m = (_as_voxel_map(mask, u, "mask") != 0).to(device=u.device, dtype=dtype)
    empty = (m.flatten(1).sum(1) == 0).nonzero().flatten().tolist()
    if empty:
        raise InputError(f"the mask is empty for image(s) {empty} of the batch: the loss needs at least "
                         "one voxel inside the mask; pass a non-empty mask or skip that patch")
    return m


def _channel_weights(weights: Weights, channels: int, like: torch.Tensor) -> torch.Tensor:
    """Channel weights as a (C,) tensor (ones when None)."""
    if weights is None:
        return torch.ones(channels, dtype=like.dtype, device=like.device)
    w = torch.as_tensor(weights, dtype=like.dtype, device=like.device).flatten()
    if w.numel() != channels:
        raise InputError(f"channel_weights needs one weight per channel of y ({channels}), got {w.numel()}")
    if bool((w < 0).any()):
        raise InputError("channel_weights must be non-negative")
    return w


def _masked_mean(values: torch.Tensor, m: torch.Tensor) -> torch.Tensor:
    """Per-image mean of ``values`` (N, 1, *spatial) over the voxels of ``m`` -> (N,)."""
    return (values * m).flatten(1).sum(1) / m.flatten(1).sum(1)


def _reduce(per_image: torch.Tensor, reduction: str) -> torch.Tensor:
    if reduction == "mean":
        return per_image.mean()
    if reduction == "sum":
        return per_image.sum()
    return per_image


def _neighbour_sum(x: torch.Tensor) -> torch.Tensor:
    """Sum of each voxel's 8 (2-D) / 26 (3-D) neighbours, zero padding, per channel.

    x: (N, K, *spatial) -> (N, K, *spatial). The 3^d box sum, done separably (three shifted adds per
    axis on a zero-padded copy), minus the centre: the same as a convolution with a ones kernel
    without its centre, and several times faster on CPU than a single-channel convolution.
    """
    box = x
    for axis in range(2, x.dim()):
        padded = F.pad(box, _pad_one(x.dim(), axis))
        length = x.shape[axis]
        box = padded.narrow(axis, 0, length) + padded.narrow(axis, 1, length) + padded.narrow(axis, 2, length)
    return box - x


def _pad_one(ndim: int, axis: int) -> Tuple[int, ...]:
    """``F.pad`` widths adding one zero on both sides of ``axis`` only (F.pad lists the last axis first)."""
    widths = [0] * (2 * (ndim - 2))
    position = 2 * (ndim - 1 - axis)
    widths[position] = widths[position + 1] = 1
    return tuple(widths)


# ------------------------------------------------------------------------------------------- RFCM


def fcm_centroids(u: torch.Tensor, y: torch.Tensor, q: float = 2.0, mask: Optional[torch.Tensor] = None,
                  eps: float = 1e-8) -> torch.Tensor:
    """Fuzzy centroids ``v[n, k] = sum_j u^q y / (sum_j u^q + eps)`` over the masked voxels of image ``n``.

    Args:
        u: memberships (N, K, *spatial).
        y: intensities (N, C, *spatial).
        q: fuzzifier (>= 1).
        mask: optional (N, 1, *spatial) / (N, *spatial) voxel set.
        eps: keeps the centroid of an empty class defined (it goes to 0, no NaN).

    Returns:
        (N, K, C) centroids in the compute dtype; gradients flow to ``u`` and ``y``.
    """
    _check_u(u)
    _check_y(y, u)
    _check_q(q)
    dtype = _compute_dtype(u, y)
    with torch.autocast(device_type=u.device.type, enabled=False):
        m = _mask_weights(mask, u, dtype)
        uq = u.to(dtype).pow(q) * m
        return _centroids(uq, y.to(dtype), eps)


def _centroids(uq: torch.Tensor, y: torch.Tensor, eps: float) -> torch.Tensor:
    """(N, K, *sp) masked u^q, (N, C, *sp) y -> (N, K, C)."""
    num = torch.einsum("nkp,ncp->nkc", uq.flatten(2), y.flatten(2))
    return num / (uq.flatten(2).sum(2).unsqueeze(2) + eps)


def _data_term(uq: torch.Tensor, y: torch.Tensor, v: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """Per voxel ``sum_k u^q sum_c w_c (y_c - v_kc)^2`` -> (N, 1, *spatial)."""
    extra = (1,) * (y.dim() - 2)
    diff = y.unsqueeze(1) - v.reshape(v.shape + extra)                  # (N, K, C, *spatial)
    dist = (diff.pow(2) * w.reshape((1, 1, -1) + extra)).sum(2)         # (N, K, *spatial)
    return (uq * dist).sum(1, keepdim=True)


def _spatial_term(uq: torch.Tensor) -> torch.Tensor:
    """Per voxel ``sum_k u[j,k]^q sum_{l in N(j)} sum_{m != k} u[l,m]^q`` -> (N, 1, *spatial).

    ``uq`` is already multiplied by the mask, so neighbours outside the mask (or the image) count as 0.
    Uses ``sum_{m != k} u[l,m]^q = S[l] - u[l,k]^q`` with ``S = sum_m u^q`` (one convolution).
    """
    others = uq.sum(1, keepdim=True) - uq
    return (uq * _neighbour_sum(others)).sum(1, keepdim=True)


def rfcm_terms(u: torch.Tensor, y: torch.Tensor, q: float = 2.0, mask: Optional[torch.Tensor] = None,
               channel_weights: Weights = None, reduction: str = "mean",
               eps: float = 1e-8) -> Tuple[torch.Tensor, torch.Tensor]:
    """The two terms of the robust FCM loss, ``(D, R)``, so that ``L_RFCM = D + beta * R``.

    * ``D`` = mean over masked voxels j of ``sum_k u[j,k]^q sum_c w_c (y[j,c] - v[k,c])^2``, centroids
      ``v`` from :func:`fcm_centroids` (gradients flow through them).
    * ``R`` = mean over masked voxels j of ``sum_k u[j,k]^q sum_{l in N(j)} sum_{m != k} u[l,m]^q`` with
      ``N(j)`` the 8 (2-D) / 26 (3-D) neighbours. Neighbours outside the image (zero padding) **or outside
      the mask** contribute nothing: memberships are multiplied by the mask before the convolution.

    Args:
        u: memberships (N, K, *spatial). y: intensities (N, C, *spatial).
        q: fuzzifier. mask: optional voxel set. channel_weights: (C,) non-negative weights ``w_c`` of the
        squared distance (default all 1). reduction: "mean" | "sum" | "none" over the N images.
        eps: centroid denominator guard.

    Returns:
        ``(D, R)``, each a scalar (or (N,) for ``reduction="none"``).
    """
    _check_u(u)
    _check_y(y, u)
    _check_q(q)
    _check_reduction(reduction)
    dtype = _compute_dtype(u, y)
    with torch.autocast(device_type=u.device.type, enabled=False):
        m = _mask_weights(mask, u, dtype)
        y = y.to(dtype)
        uq = u.to(dtype).pow(q) * m
        w = _channel_weights(channel_weights, y.shape[1], y)
        data = _masked_mean(_data_term(uq, y, _centroids(uq, y, eps), w), m)
        spatial = _masked_mean(_spatial_term(uq), m)
    return _reduce(data, reduction), _reduce(spatial, reduction)


def rfcm_loss(u: torch.Tensor, y: torch.Tensor, q: float = 2.0, beta: float = 0.0008,
              mask: Optional[torch.Tensor] = None, channel_weights: Weights = None, reduction: str = "mean",
              eps: float = 1e-8) -> torch.Tensor:
    """Robust fuzzy C-means loss ``D + beta * R`` (Chen et al. 2021); terms as in :func:`rfcm_terms`.

    ``beta = 0.0008`` is the paper's value for intensities scaled to about [0, 1]; ``D`` scales with the
    square of the intensities and ``R`` does not, so rescale ``beta`` with the input normalisation.
    Returns a scalar, or (N,) per-image losses for ``reduction="none"``.
    """
    data, spatial = rfcm_terms(u, y, q, mask, channel_weights, reduction, eps)
    return data + beta * spatial


# ------------------------------------------------------------------------------- labels and semi


def _label_mask(labels: torch.Tensor, u: torch.Tensor, ignore_index: int) -> torch.Tensor:
    """Integer labels -> (N, 1, *spatial) long map, validated against ``u``'s classes."""
    if not isinstance(labels, torch.Tensor) or labels.is_floating_point() or labels.is_complex():
        raise InputError("labels must be an integer tensor (N, *spatial); use ignore_index for unlabelled voxels")
    lab = _as_voxel_map(labels, u, "labels").to(device=u.device, dtype=torch.long)
    bad = (lab != ignore_index) & ((lab < 0) | (lab >= u.shape[1]))
    if bool(bad.any()):
        raise InputError(f"labels must be class indices 0..{u.shape[1] - 1} or ignore_index={ignore_index}, "
                         f"found {sorted(set(lab[bad].tolist()))[:5]}")
    return lab


def fcm_label_loss(u: torch.Tensor, labels: torch.Tensor, q: float = 2.0, ignore_index: int = -1,
                   mask: Optional[torch.Tensor] = None, reduction: str = "mean") -> torch.Tensor:
    """Supervised FCM loss: membership mass on the wrong classes at labelled voxels.

    ``L = mean_{j in P} sum_k u[j,k]^q (1 - g[j,k])^2`` with ``g`` the one-hot labels and ``P`` the labelled
    voxels (``labels != ignore_index``, and inside ``mask`` when given) of the **whole batch**.

    Args:
        u: memberships (N, K, *spatial).
        labels: integer class map (N, *spatial) or (N, 1, *spatial); ``ignore_index`` = unlabelled.
        q: fuzzifier. ignore_index: value of unlabelled voxels (default -1).
        mask: optional voxel set further restricting ``P`` (an empty mask is allowed here).
        reduction: "mean" over ``P`` or "sum" over ``P``.

    Returns:
        Scalar. With no labelled voxel it is 0 (still connected to ``u``'s graph), never NaN.
    """
    _check_u(u)
    _check_q(q)
    if reduction not in ("mean", "sum"):
        raise InputError(f"fcm_label_loss reduction must be 'mean' or 'sum', got {reduction!r}")
    dtype = _compute_dtype(u)
    with torch.autocast(device_type=u.device.type, enabled=False):
        lab = _label_mask(labels, u, ignore_index)
        labelled = lab != ignore_index
        if mask is not None:
            labelled = labelled & (_as_voxel_map(mask, u, "mask").to(u.device) != 0)
        classes = torch.arange(u.shape[1], device=u.device).reshape((1, -1) + (1,) * (u.dim() - 2))
        wrong = (lab != classes) & labelled                        # (N, K, *spatial): (1 - g)^2 on P
        total = (u.to(dtype).pow(q) * wrong.to(dtype)).sum()
        if reduction == "sum":
            return total
        return total / labelled.sum().clamp(min=1).to(dtype)


def semi_supervised_loss(u: torch.Tensor, y: torch.Tensor, labels: Optional[torch.Tensor],
                         alpha: float = 0.1, q: float = 2.0, beta: float = 0.0008,
                         mask: Optional[torch.Tensor] = None, channel_weights: Weights = None,
                         ignore_index: int = -1) -> torch.Tensor:
    """``L_RFCM + alpha * L_label`` (scalar; both terms "mean"-reduced).

    The RFCM part uses every voxel of ``mask``; the label part the labelled voxels inside ``mask``. With no
    labelled voxel (or ``labels=None``) it equals :func:`rfcm_loss`. The paper used ``alpha`` = 0.1 (SPECT)
    / 0.2 (CT) with fully labelled images; for a few painted strokes use a larger ``alpha``.
    """
    loss = rfcm_loss(u, y, q=q, beta=beta, mask=mask, channel_weights=channel_weights)
    if labels is None:
        return loss
    return loss + alpha * fcm_label_loss(u, labels, q=q, ignore_index=ignore_index, mask=mask)


# ------------------------------------------------------------------------------------------- ACWE


def _forward_gradient_norm(u: torch.Tensor, eps: float) -> torch.Tensor:
    """``sqrt(|grad u|^2 + eps)`` with forward differences (0 across the last row/column/slice).

    u: (N, 1, *spatial) -> (N, 1, *spatial).
    """
    sq = torch.zeros_like(u)
    for axis in range(2, u.dim()):        # 2 or 3 spatial axes, not voxels
        diff = torch.diff(u, dim=axis)
        sq = sq + F.pad(diff.pow(2), [0, 0] * (u.dim() - 1 - axis) + [0, 1])
    return torch.sqrt(sq + eps)


def acwe_loss(u_fg: torch.Tensor, y: torch.Tensor, lambda1: float = 1.0, lambda2: float = 1.0,
              mu: float = 0.01, length: Optional[str] = "length", eps: float = 1e-8,
              reduction: str = "mean") -> torch.Tensor:
    """Binary active-contour-without-edges loss (Chen & Frey, MIDL 2020; Chan & Vese).

    Per image, with ``c_in = sum u y / (sum u + eps)`` and ``c_out = sum (1-u) y / (sum (1-u) + eps)``
    (one value per channel of ``y``)::

        L = mean_j [ lambda1 u |y - c_in|^2 + lambda2 (1 - u) |y - c_out|^2 ] + mu * T,
        T = mean_j sqrt(|grad u|^2 + eps)   (length="length", forward differences)
          = mean_j u                        (length="area", as in the published code)
          = 0                               (length=None)

    Means (not sums) over voxels, so ``mu`` does not depend on the image size; it does depend on the
    intensity scale (the default 0.01 is for intensities of order [0, 1]).

    Args:
        u_fg: foreground membership in [0, 1], (N, 1, *spatial), or (N, *spatial) (one dimension fewer
            than ``y``).
        y: intensities (N, C, *spatial); multi-channel distances are summed over channels.
        reduction: "mean" | "sum" | "none" over the N images.

    Returns:
        Scalar (or (N,) for ``reduction="none"``).
    """
    if isinstance(u_fg, torch.Tensor) and isinstance(y, torch.Tensor) and u_fg.dim() == y.dim() - 1:
        u_fg = u_fg.unsqueeze(1)
    _check_u(u_fg, "u_fg")
    if u_fg.shape[1] != 1:
        raise InputError(f"u_fg must hold one foreground channel, got shape {tuple(u_fg.shape)}")
    _check_y(y, u_fg)
    _check_reduction(reduction)
    if length not in LENGTH_TERMS:
        raise InputError(f"length must be one of {LENGTH_TERMS}, got {length!r}")
    dtype = _compute_dtype(u_fg, y)
    with torch.autocast(device_type=u_fg.device.type, enabled=False):
        u, y = u_fg.to(dtype), y.to(dtype)
        memberships = torch.cat([u, 1.0 - u], dim=1)                    # (N, 2, *spatial)
        c = _centroids(memberships, y, eps)                             # (N, 2, C)
        weights = torch.ones(y.shape[1], dtype=dtype, device=y.device)
        scaled = memberships * torch.tensor([lambda1, lambda2], dtype=dtype, device=y.device).reshape(
            (1, 2) + (1,) * (u.dim() - 2))
        per_image = _data_term(scaled, y, c, weights).flatten(1).mean(1)
        if length == "length":
            per_image = per_image + mu * _forward_gradient_norm(u, eps).flatten(1).mean(1)
        elif length == "area":
            per_image = per_image + mu * u.flatten(1).mean(1)
    return _reduce(per_image, reduction)


# ---------------------------------------------------------------------------------- nn.Module wrappers


class RFCMLoss(torch.nn.Module):
    """Module form of :func:`rfcm_loss`: ``RFCMLoss(q, beta, channel_weights)(u, y, mask=None)``."""

    def __init__(self, q: float = 2.0, beta: float = 0.0008, channel_weights: Weights = None,
                 reduction: str = "mean") -> None:
        super().__init__()
        self.q, self.beta, self.channel_weights, self.reduction = q, beta, channel_weights, reduction

    def forward(self, u: torch.Tensor, y: torch.Tensor, mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        return rfcm_loss(u, y, self.q, self.beta, mask, self.channel_weights, self.reduction)


class FCMLabelLoss(torch.nn.Module):
    """Module form of :func:`fcm_label_loss`: ``FCMLabelLoss(q, ignore_index)(u, labels, mask=None)``."""

    def __init__(self, q: float = 2.0, ignore_index: int = -1) -> None:
        super().__init__()
        self.q, self.ignore_index = q, ignore_index

    def forward(self, u: torch.Tensor, labels: torch.Tensor, mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        return fcm_label_loss(u, labels, self.q, self.ignore_index, mask)


class SemiSupervisedFCMLoss(torch.nn.Module):
    """Module form of :func:`semi_supervised_loss`: ``(u, y, labels=None, mask=None) -> scalar``."""

    def __init__(self, alpha: float = 0.1, q: float = 2.0, beta: float = 0.0008,
                 channel_weights: Weights = None, ignore_index: int = -1) -> None:
        super().__init__()
        self.alpha, self.q, self.beta = alpha, q, beta
        self.channel_weights, self.ignore_index = channel_weights, ignore_index

    def forward(self, u: torch.Tensor, y: torch.Tensor, labels: Optional[torch.Tensor] = None,
                mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        return semi_supervised_loss(u, y, labels, self.alpha, self.q, self.beta, mask,
                                    self.channel_weights, self.ignore_index)


class ACWELoss(torch.nn.Module):
    """Module form of :func:`acwe_loss`: ``ACWELoss(lambda1, lambda2, mu, length)(u_fg, y)``."""

    def __init__(self, lambda1: float = 1.0, lambda2: float = 1.0, mu: float = 0.01,
                 length: Optional[str] = "length", eps: float = 1e-8) -> None:
        super().__init__()
        self.lambda1, self.lambda2, self.mu, self.length, self.eps = lambda1, lambda2, mu, length, eps

    def forward(self, u_fg: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return acwe_loss(u_fg, y, self.lambda1, self.lambda2, self.mu, self.length, self.eps)
