"""sparsify: unstructured or N:M weight sparsity of linear layers (magnitude, Wanda, SparseGPT)."""

from __future__ import annotations

import torch

from kiln.errors import PassError
from kiln.ir import Graph, Node
from kiln.log import get, step

from .registry import count, register

log = get("prune")

METHODS = ("magnitude", "wanda", "sparsegpt")


def parse_pattern(pattern: str) -> tuple[int, int] | None:
    """'unstructured' -> None; 'N:M' -> (N, M): at most N nonzeros in every M consecutive input weights."""
    if pattern == "unstructured":
        return None
    try:
        n, m = (int(x) for x in str(pattern).split(":"))
    except ValueError:
        raise PassError(f"sparsify: pattern must be 'unstructured' or N:M like 2:4, got {pattern!r}") from None
    if not 0 < n < m:
        raise PassError(f"sparsify: pattern {pattern} needs 0 < N < M")
    return n, m


def _mask(score: torch.Tensor, ratio: float, nm: tuple[int, int] | None, per_row: bool) -> torch.Tensor:
    """True where a weight is removed: the lowest scores, per row, per layer, or per N:M group."""
    N, K = score.shape
    if nm is not None:
        n, m = nm
        s = score.reshape(N, K // m, m)
        drop = s.topk(m - n, dim=-1, largest=False).indices
        return torch.zeros_like(s, dtype=torch.bool).scatter_(-1, drop, True).reshape(N, K)
    if per_row:
        k = int(K * ratio)
        drop = score.topk(k, dim=1, largest=False).indices
        return torch.zeros_like(score, dtype=torch.bool).scatter_(1, drop, True)
    k = int(score.numel() * ratio)
    thresh = score.flatten().kthvalue(max(k, 1)).values if k else -1.0
    return score <= thresh if k else torch.zeros_like(score, dtype=torch.bool)


def sparsegpt(
    w: torch.Tensor, H: torch.Tensor, ratio: float, nm: tuple[int, int] | None, block: int = 128, damp: float = 0.01
) -> torch.Tensor:
    """SparseGPT (Frantar & Alistarh, 2023): choose the mask by w² / [H⁻¹]ᵢᵢ block by block and update the
    remaining weights of each row to compensate the removed ones (an OBS step through the Cholesky factor
    of the inverse Hessian of the layer's squared error, H = XᵀX)."""
    W = w.clone().float()
    N, K = W.shape
    H = H.clone().float()
    dead = torch.diag(H) == 0
    H[dead, dead] = 1.0
    W[:, dead] = 0.0
    H += damp * torch.diag(H).mean() * torch.eye(K)
    Hinv = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(H)), upper=True)
    for a in range(0, K, block):
        b = min(a + block, K)
        W1, Hi = W[:, a:b].clone(), Hinv[a:b, a:b]
        Q1, E1 = torch.zeros_like(W1), torch.zeros_like(W1)
        d = torch.diag(Hi)
        mask = (
            _mask(W1**2 / d[None, :] ** 2, ratio, None, False) if nm is None else torch.zeros_like(W1, dtype=torch.bool)
        )
        for i in range(b - a):
            if nm is not None and i % nm[1] == 0:
                mask[:, i : i + nm[1]] = _mask(W1[:, i : i + nm[1]] ** 2 / d[None, i : i + nm[1]] ** 2, ratio, nm, True)
            col = W1[:, i]
            q = torch.where(mask[:, i], torch.zeros_like(col), col)
            Q1[:, i] = q
            err = (col - q) / Hi[i, i]
            W1[:, i:] -= err[:, None] * Hi[i, i:][None, :]
            E1[:, i] = err
        W[:, a:b] = Q1
        W[:, b:] -= E1 @ Hinv[a:b, b:]
    return W


def _targets(g: Graph, lm_head: bool) -> list[Node]:
    from .qweights import is_lm_head

    return [n for n in g.nodes if n.op == "linear" and n.inputs[1].op == "param" and (lm_head or not is_lm_head(g, n))]


@register("sparsify", exact=False, phase="prune")
def sparsify(
    graph: Graph,
    ratio: float = 0.5,
    pattern: str = "unstructured",
    method: str = "wanda",
    lm_head: bool = False,
    calib_windows: int = 4,
    compressed: bool = True,
) -> Graph:
    """Matches: linear layers with parameter weights (not the output layer unless lm_head=true); run before
    fuse-mlp (wanda and sparsegpt observe each linear's input) and before quantization.
    Guarantees: pattern=unstructured zeroes `ratio` of each layer's weights; pattern=N:M (2:4) leaves at
    most N nonzeros in every M consecutive input weights of a row. method=magnitude drops the smallest
    |W| of the layer; wanda the smallest |W|·||X_j|| of each row (Sun et al., 2023); sparsegpt chooses by
    w²/[H⁻¹]ᵢᵢ and updates the surviving weights (Frantar & Alistarh, 2023). The weights stay dense
    tensors with zeros in the IR (graph.meta['sparsity'] lists them). On the CPU a 2:4 weight runs
    compressed (kept values + 2-bit indices, read directly by the 2:4 kernels: less memory, faster decode);
    compressed=false keeps the dense kernels, and other patterns are stored compactly on disk (bitmask +
    values, or N:M values + indices) and expanded at load. Lossy."""
    nm = parse_pattern(pattern)
    if method not in METHODS:
        raise PassError(f"sparsify: method must be one of {', '.join(METHODS)}, got {method!r}")
    if nm is None and not 0.0 <= float(ratio) < 1.0:
        raise PassError(f"sparsify: ratio {ratio} is outside [0, 1); 0.5 removes half of every layer's weights")
    g = graph.copy()
    if nm is None and float(ratio) == 0.0:
        return g
    if g.find("gated_mlp") and method != "magnitude":
        raise PassError(f"sparsify method={method} observes each linear's input: run it before fuse-mlp")
    lins = _targets(g, bool(lm_head))
    if nm is not None:
        bad = [n for n in lins if int(n.inputs[1].type.shape[1]) % nm[1]]
        if bad:
            raise PassError(
                f"sparsify: {pattern} needs input sizes divisible by {nm[1]}; %{bad[0].name} has "
                f"{bad[0].inputs[1].type.shape[1]}"
            )
    stats = {}
    if method != "magnitude":
        if "calib_tokens" not in g.meta:
            raise PassError(
                f"sparsify method={method} reads calibration text: pass calib=... to kiln.compile "
                "(--calib on the command line), or use method=magnitude"
            )
        from kiln.calib import collect_input_stats

        stats = collect_input_stats(
            g, list({n.inputs[0] for n in lins}), g.meta["calib_tokens"][: int(calib_windows)], keep_rows=0
        )
    record = g.meta.setdefault("sparsity", {"params": {}})
    done: set[str] = set()
    zeros = total = 0
    for li, n in enumerate(lins, 1):
        step(log, f"sparsify ({method}): layer", li, len(lins))
        name = n.inputs[1].attrs["name"]
        if name in done:
            continue
        done.add(name)
        w = g.params[name].float()
        H = stats[n.inputs[0]].H if method != "magnitude" else None  # X^T X of the input, as calibrated
        if method == "sparsegpt":
            assert H is not None  # the calibration windows ran through every target's input
            new = sparsegpt(w, H.float(), float(ratio), nm)
        else:
            if method == "magnitude":
                score = w.abs()
            else:
                assert H is not None  # the calibration windows ran through every target's input
                score = w.abs() * H.diagonal().float().sqrt()[None, :]
            new = w.masked_fill(_mask(score, float(ratio), nm, method == "wanda"), 0.0)
        g.params[name] = new.to(g.params[name].dtype).contiguous()
        record["params"][name] = pattern if nm else "unstructured"
        zeros += int((new == 0).sum())
        total += new.numel()
        count(f"sparse-{pattern}")
    record.update(
        compressed=bool(compressed),
        pattern=str(pattern),
        method=method,
        ratio=float(ratio) if nm is None else 1 - nm[0] / nm[1],
    )
    g.meta["pass_extra"] = {
        "pattern": str(pattern),
        "method": method,
        "density": round(1 - zeros / max(total, 1), 4),
        "sparse_params": len(done),
        "note": "dense tensors in the IR; the CPU target runs 2:4 weights compressed (compressed=false: dense) "
        "and stores other patterns compactly, expanded at load",
    }
    return g
