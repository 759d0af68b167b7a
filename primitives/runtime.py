"""The operators of the expression language, in torch: the one implementation.

This module imports only torch: the evaluator calls these functions, and exported metrics
(`evoprune export --format python`) carry this file's source verbatim, so the two cannot drift.

Every operator is total: on finite inputs it returns finite values (results are clamped to
+-BIG, a division's denominator is kept at least EPS away from zero, the log's argument at
least EPS above it). Normalizers work along the last axis (the filters of one layer);
`mask` marks real filters when several layers are padded into one [L, C_max] tensor.
"""
import torch

BIG = 1e30  # clamp bound; float32 overflows past 3.4e38
EPS = 1e-6  # protected division and log


def _c(t):
    return torch.clamp(t, -BIG, BIG)


def add(a, b):
    return _c(a + b)


def sub(a, b):
    return _c(a - b)


def mul(a, b):
    return _c(a * b)


def pdiv(a, b):
    """a / b, with b pushed to +-EPS when |b| < EPS (sign of zero taken as +)."""
    b = torch.as_tensor(b)
    safe = torch.where(b.abs() < EPS, torch.where(b < 0, -EPS, EPS), b)
    return _c(a / safe)


def pabs(a):
    return torch.abs(a)


def psqrt(a):
    """sqrt(|a|)"""
    return torch.sqrt(torch.abs(a))


def plog(a):
    """log(|a| + EPS)"""
    return torch.log(torch.abs(a) + EPS)


def square(a):
    return _c(a * a)


def neg(a):
    return -a


def pmin(a, b):
    return torch.minimum(torch.as_tensor(a), torch.as_tensor(b))


def pmax(a, b):
    return torch.maximum(torch.as_tensor(a), torch.as_tensor(b))


def _valid(x, mask):
    m = torch.ones(x.shape[-1], dtype=torch.bool) if mask is None else mask
    return m.expand(x.shape)


def _layer_mean(x, m):
    n = m.sum(-1, keepdim=True).clamp_min(1)
    return torch.where(m, x, 0.0).sum(-1, keepdim=True) / n


def zscore(x, mask=None):
    """Per layer: (x - mean) / (std + EPS), population std."""
    x, m = _c(x), _valid(x, mask)  # clamped first: a mean of values near float max would overflow
    mu = _layer_mean(x, m)
    d = x - mu
    # a deviation within rounding of the mean is none: a constant layer scores exactly 0, not
    # its rounding error divided by EPS
    d = torch.where(d.abs() <= 16 * torch.finfo(x.dtype).eps * mu.abs(), 0.0, d)
    sd = torch.sqrt(_layer_mean(d ** 2, m))
    return _c(torch.where(m, d / (sd + EPS), 0.0))


def rank(x, mask=None):
    """Per layer: the rank of each filter scaled to [0, 1]; tied filters share their average rank
    (so a constant ranks 0.5 everywhere, whatever the filters' order)."""
    m = _valid(x, mask)
    srt = torch.sort(torch.where(m, x, torch.inf), dim=-1).values.contiguous()
    q = torch.where(m, x, 0.0).contiguous()
    lo = torch.searchsorted(srt, q, right=False)
    hi = torch.searchsorted(srt, q, right=True)
    n = m.sum(-1, keepdim=True).to(x.dtype)
    r = (lo + hi - 1).to(x.dtype) / 2
    return torch.where(m, r / (n - 1).clamp_min(1), 0.0)


def mnorm(x, mask=None):
    """Per layer: x / (mean |x| + EPS)."""
    x, m = _c(x), _valid(x, mask)
    return _c(torch.where(m, x / (_layer_mean(torch.abs(x), m) + EPS), 0.0))


def full(x, mask):
    """A normalizer's argument over every layer: a constant or a per-class-free [L, C] stays."""
    return x.expand(mask.shape) if x.dim() < 2 else x


def finish(x, mask):
    """The scores [L, C_max]: per-class results [K, L, C_max] are averaged over classes."""
    if x.dim() == 3:
        x = x.mean(0)
    return x.expand(mask.shape).clone() if x.shape != mask.shape else x
