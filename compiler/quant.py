"""Quantization schemes and the math that picks integer codes (RTN, GPTQ, AWQ), in torch.

A weight [N, K] becomes integer codes q [N, K], scales s [N, K/group] and (asymmetric) zero points
z [N, K/group], with dequantized value (q - z) * s. Symmetric schemes fix z = 2^(bits-1), so codes
are always unsigned and in [0, 2^bits - 1]. group = 0 means one group per output channel.

Asymmetric zero points are codes by default: the range is widened to include 0 and z = round(-lo / s),
so a weight of exactly 0 dequantizes to exactly 0 (pruned weights rely on it). The `_floatzero` variant
(`int4_g32_floatzero`) spans each group's [min, max] exactly with a float z = -min / s. Its weight
error is lower (SQNR +0.25 dB at g32, +0.07 dB at g128 on SmolLM2's embedding) and it reproduces a
checkpoint stored on a float-minimum grid of its group (GGUF Q4_1 at g32) exactly, yet on SmolLM2-135M
at g128 the model got worse (perplexity +88% over fp32 against +57%, KL 0.62 against 0.60, 8k tokens),
so it is a choice to measure, not the default.
"""

from __future__ import annotations

import difflib
import re
from dataclasses import asdict, dataclass

import torch

from .errors import KilnError


@dataclass(frozen=True)
class WeightQuant:
    """Weight-only integer quantization scheme, recorded in the manifest by name and version."""

    name: str
    bits: int
    group: int  # 0 = per output channel
    sym: bool
    float_zero: bool = False  # asymmetric only: the grid spans the group's [min, max], z a float
    version: int = 1

    def group_for(self, k: int) -> int:
        """Group size for an input dim of k. When it does not divide k (SmolLM2's 576 with 128), the
        last group is shorter: there are ceil(k / group) groups."""
        return min(self.group or k, k)

    def to_json(self) -> dict:
        return asdict(self)


COMMON_SCHEMES = (
    "int8",
    "int4",
    "int4_sym",
    "int4_g32",
    "int4_g64",
    "int4_g128",
    "int4_g32_sym",
    "int4_g128_sym",
    "int3_g64",
    "int3_g32",
    "int2_g32",
    "int4_g32_floatzero",
)


def parse_scheme(name: str) -> WeightQuant:
    """'int8', 'int4_g128', 'int4_g128_sym', 'int4_sym' (per-channel), 'int3_g64', ...

    Defaults: per-channel schemes are symmetric, group-wise ones asymmetric (as GGUF's Q4_1 and
    most int4 checkpoints); `_sym` / `_asym` override. `_floatzero` (asymmetric only) spans each
    group's true range with a float zero point (see the module docstring)."""
    m = re.fullmatch(r"int([2-8])(?:_g(\d+))?(_sym|_asym)?(_floatzero)?", name.strip())
    if not m:
        close = difflib.get_close_matches(name.strip(), COMMON_SCHEMES, n=1, cutoff=0.6)
        hint = f"did you mean '{close[0]}'? " if close else ""
        raise KilnError(
            f"unknown quantization scheme '{name}': {hint}use int8, int4_g128, int4_g32_sym, int4_sym, "
            "int3_g64 ... (int<bits>[_g<group>][_sym|_asym][_floatzero], bits 2..8)"
        )
    bits, group = int(m.group(1)), int(m.group(2) or 0)
    sym = (m.group(3) == "_sym") if m.group(3) else group == 0
    if sym and m.group(4):
        raise KilnError(
            f"quantization scheme '{name}': _floatzero sets the zero point of asymmetric schemes; a symmetric "
            "one has none of its own (drop _floatzero, or use _asym_floatzero)"
        )
    return WeightQuant(name.strip(), bits, group, sym, float_zero=bool(m.group(4)))


def integer_zero(scheme: WeightQuant) -> WeightQuant:
    """The scheme with integer zero points, so that 0 stays exact (itself when it has them already)."""
    return parse_scheme(scheme.name.removesuffix("_floatzero")) if scheme.float_zero else scheme


def _qrange(bits: int) -> int:
    return (1 << bits) - 1


def _grouped(w: torch.Tensor, g: int, edge: bool = False) -> torch.Tensor:
    """[N, K] -> [N, ceil(K/g), g]; a ragged last group is zero-padded, or with edge=True padded with
    its last column (which changes neither its absmax nor its min and max, where zeros would)."""
    n, k = w.shape
    pad = -k % g
    if pad:
        fill = w[:, -1:].expand(-1, pad) if edge else w.new_zeros(n, pad)
        w = torch.cat([w, fill], 1)
    return w.reshape(n, (k + pad) // g, g)


def params_for(
    w: torch.Tensor, scheme: WeightQuant, clip: torch.Tensor | float = 1.0
) -> tuple[torch.Tensor, torch.Tensor]:
    """Scales and zero points [N, G] from the weight's range in each group (round to nearest),
    optionally shrunk by a clip ratio (scalar or [N, G]). Asymmetric: the grid spans the group's
    [min, max] with a float zero point (float_zero), else a range widened to include 0 and z a code."""
    wg = _grouped(w, scheme.group_for(w.shape[1]), edge=True)
    qmax = _qrange(scheme.bits)
    if scheme.sym:
        half = 1 << (scheme.bits - 1)
        s = (wg.abs().amax(-1) * clip).clamp_min(1e-12) / (half - 1 if scheme.bits > 1 else 1)
        z = torch.full_like(s, float(half))
    elif scheme.float_zero:
        lo, hi = wg.amin(-1) * clip, wg.amax(-1) * clip
        # a constant group (hi == lo) still needs a step: its value's magnitude keeps z = -lo/s small
        s = torch.where(hi > lo, (hi - lo) / qmax, lo.abs() / qmax).clamp_min(1e-12)
        z = -lo / s
    else:
        lo, hi = wg.amin(-1).clamp_max(0) * clip, wg.amax(-1).clamp_min(0) * clip
        s = ((hi - lo) / qmax).clamp_min(1e-12)
        z = torch.round(-lo / s).clamp(0, qmax)
    return s, z


def quantize_with(w: torch.Tensor, s: torch.Tensor, z: torch.Tensor, scheme: WeightQuant) -> torch.Tensor:
    """Codes for w given per-group scales and zero points: clamp(round(w / s + z), 0, qmax)."""
    n, k = w.shape
    return _codes(_grouped(w, scheme.group_for(k)), s[..., None], z[..., None], scheme.bits).reshape(n, -1)[:, :k]


def _codes(w: torch.Tensor, s: torch.Tensor, z: torch.Tensor, bits: int) -> torch.Tensor:
    """round(w / s + z), computed as round(w / s + frac(z)) + int(z): for an integer z that is exactly
    round(w / s) + z (ties included), so integer-zero codes do not depend on how z is added."""
    zi = torch.round(z)
    return (torch.round(w / s + (z - zi)) + zi).clamp(0, _qrange(bits))


def dequantize(q: torch.Tensor, s: torch.Tensor, z: torch.Tensor, group: int) -> torch.Tensor:
    n, k = q.shape
    return ((_grouped(q.float(), group or k) - z[..., None]) * s[..., None]).reshape(n, -1)[:, :k]


def rtn(w: torch.Tensor, scheme: WeightQuant) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Round to nearest: (codes uint8 [N, K], scales [N, G], zeros [N, G])."""
    w = w.float()
    s, z = params_for(w, scheme)
    return quantize_with(w, s, z, scheme).to(torch.uint8), s, z


def gptq(
    w: torch.Tensor,
    H: torch.Tensor,
    scheme: WeightQuant,
    block: int = 128,
    damp: float = 0.01,
    act_order: bool = True,
    X: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """GPTQ (Frantar et al., 2023): quantize columns one by one and push each column's rounding error
    onto the columns not yet quantized, weighted by the inverse Hessian H = X^T X of the layer's
    calibration inputs. With act_order, columns go in order of decreasing H diagonal (largest
    activations first); group scales are then fixed up front ("static groups", clip-searched on X
    when given) so groups stay contiguous in the original order, as the kernels need."""
    W = w.float().clone()
    n, k = W.shape
    g = scheme.group_for(k)
    H = H.double().clone()
    dead = torch.diag(H) == 0
    H[dead, dead] = 1
    W[:, dead] = 0
    S, Z = clip_search(W, X, scheme) if X is not None else params_for(W, scheme)
    perm = torch.argsort(torch.diag(H), descending=True) if act_order else torch.arange(k)
    W, H = W[:, perm], H[perm][:, perm]
    gidx = perm // g
    H += damp * torch.mean(torch.diag(H)) * torch.eye(k, dtype=H.dtype)
    Hinv = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(H)), upper=True).float()
    Q = torch.zeros_like(W)
    for i1 in range(0, k, block):
        i2 = min(i1 + block, k)
        W1, Q1, E1 = W[:, i1:i2].clone(), torch.zeros(n, i2 - i1), torch.zeros(n, i2 - i1)
        Hinv1 = Hinv[i1:i2, i1:i2]
        for i in range(i2 - i1):
            col = i1 + i
            s, z = S[:, gidx[col]], Z[:, gidx[col]]
            w1 = W1[:, i]
            q = _codes(w1, s, z, scheme.bits)
            Q1[:, i] = q
            err = (w1 - (q - z) * s) / Hinv1[i, i]
            W1[:, i:] -= err[:, None] * Hinv1[i, i:][None, :]
            E1[:, i] = err
        Q[:, i1:i2] = Q1
        W[:, i2:] -= E1 @ Hinv[i1:i2, i2:]
    return Q[:, torch.argsort(perm)].to(torch.uint8), S, Z


def clip_search(
    w: torch.Tensor,
    X: torch.Tensor | None,
    scheme: WeightQuant,
    ratios: tuple[float, ...] = (1.0, 0.95, 0.9, 0.85, 0.8, 0.75, 0.7, 0.65, 0.6, 0.55, 0.5),
) -> tuple[torch.Tensor, torch.Tensor]:
    """AWQ's weight clipping: for every (output channel, group), the range ratio whose quantized
    weights give the smallest error on the calibration inputs X [S, K]. Returns scales and zeros."""
    if X is None or X.shape[0] == 0:
        return params_for(w, scheme)
    g = scheme.group_for(w.shape[1])
    wg = _grouped(w, g)  # [N, G, g]
    xg = _grouped(X.float(), g)  # [S, G, g]
    best_err = torch.full(wg.shape[:2], float("inf"))
    best_s, best_z = params_for(w, scheme)
    for r in ratios:
        s, z = params_for(w, scheme, r)
        dq = _grouped(dequantize(quantize_with(w, s, z, scheme), s, z, g), g)
        err = torch.einsum("sGj,nGj->snG", xg, wg - dq).pow(2).sum(0)
        better = err < best_err
        best_err = torch.where(better, err, best_err)
        best_s, best_z = torch.where(better, s, best_s), torch.where(better, z, best_z)
    return best_s, best_z


def awq_scales(
    ws: list[torch.Tensor], x_absmean: torch.Tensor, X: torch.Tensor, scheme: WeightQuant, grid: int = 20
) -> torch.Tensor:
    """AWQ (Lin et al., 2024): per-input-channel scales s = mean|x|^alpha, alpha searched on a grid to
    minimize the output error of the RTN-quantized (W * s) applied to (x / s). Returns s [K]."""
    ref = [X @ w.T for w in ws]
    best, best_s = float("inf"), torch.ones_like(x_absmean)
    for i in range(grid + 1):
        a = i / grid
        s = x_absmean.clamp_min(1e-5) ** a
        s = s / (s.max() * s.min()).sqrt()
        err = 0.0
        for w, r in zip(ws, ref):
            q, sc, z = rtn(w * s[None, :], scheme)
            wq = dequantize(q, sc, z, scheme.group_for(w.shape[1])) / s[None, :]
            err += float(((X @ wq.T - r) ** 2).mean())
        if err < best:
            best, best_s = err, s
    return best_s
