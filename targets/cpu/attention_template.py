"""Paged attention on the CPU, written once for every cache layout (fp32, int8 with scales, MLA latent).

The part every layout shares lives here: the page-table lookup, the causal and sliding-window mask,
GQA head groups, optional ALiBi, padding positions (p < 0), and the online softmax (running max and
denominator, rescaled once per page). A layout supplies a :class:`CacheReader`: how one key is scored
against the query and how one value row is added into the accumulator.

Work is split over b*t*num_heads tasks, one page (page_size keys) per softmax tile, so the working
set is O(width + page_size) per task whatever the sequence length (no tokens x tokens scores).
Scratch buffers are scope "global" and < 1 KiB so they stay stack allocas (registers), and scalars
are bound with ``T.Bind`` (a plain ``x = expr`` in TVMScript becomes a heap workspace).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from tvm.script import tirx as T

NEG = -3.0e38  # "minus infinity" of the running max that exp() still handles


@dataclass(frozen=True)
class CacheReader:
    """How the online-softmax loop reads one cache layout.

    ``q`` and ``kv`` are whatever the kernel passes to the body (a buffer or a tuple of buffers): the
    loop hands them to these macros untouched.
    """

    width: int  # values per head in the output (head_dim; the latent rank for MLA)
    score: Any  # macro (q, kv, qs, tmp, s, bi, ti, h, kvh, page, jj): s[jj] = score of key jj of page
    accumulate: Any  # macro (kv, acc, e, kvh, page, jj): acc += e * value row jj of page
    load_query: Any = None  # macro (q, qs, bi, ti, h): the query as `score` reads it, once per row
    query_width: int = 0  # size of qs (0: no query scratch, `score` reads q itself)
    lanes: int = 1  # size of tmp: partial sums of a vectorized dot product


def paged_attention_body(
    num_heads: int, kv_heads: int, page_size: int, window: int, alibi: bool, reader: CacheReader, softcap: float = 0.0
) -> Any:
    """Macro ``body(q, kv, page_table, positions, slopes, out, b, t)``: causal paged attention.

    Query (bi, ti, h) at p = positions[bi, ti] attends to cached positions j in [lo, p],
    lo = max(0, p - window + 1) if window > 0 else 0, through kv head h // (num_heads // kv_heads);
    page_table [b, max_pages] i32 maps j // page_size to a page. With ``alibi`` the score of key j
    gains slopes[h] * (j - p) (slopes [num_heads] f32; ignored otherwise). With ``softcap`` > 0 the
    scaled score s becomes softcap * tanh(s / softcap) first (Gemma-2). out [b, t, num_heads, width]
    f32; p < 0 (padding) -> zeros.
    """
    H, PS, DV, QW, VL = num_heads, page_size, reader.width, reader.query_width, reader.lanes
    if H % kv_heads:
        raise ValueError(f"num_heads={H} must be a multiple of kv_heads={kv_heads}")
    G = H // kv_heads
    W = int(window)
    CAP = float(softcap)
    score, accumulate, load_query = reader.score, reader.accumulate, reader.load_query

    @T.macro
    def body(q, kv, page_table, positions, slopes, out, b, t):
        for task in T.parallel(b * t * H):
            # interleave rows so static chunking pairs short (early) and long (late) queries
            row = T.Bind(task // H)
            rr = T.Bind(T.if_then_else(row % 2 == 0, row // 2, b * t - 1 - row // 2))
            bi = T.Bind(rr // t)
            ti = T.Bind(rr % t)
            h = T.Bind(task % H)
            kvh = T.Bind(h // G)
            p = T.Bind(T.Cast("int64", positions[bi, ti]))
            if p < 0:
                for d in T.vectorized(DV):
                    out[bi, ti, h, d] = T.float32(0)
            else:
                lo = T.Bind(T.max(p - W + 1, T.int64(0)) if W > 0 else T.int64(0))
                if QW > 0:
                    qs = T.alloc_buffer((QW,), "float32", scope="global")  # the query as scored
                else:
                    qs = T.meta_var(None)
                acc = T.alloc_buffer((DV,), "float32", scope="global")  # sum softmax * v
                s = T.alloc_buffer((PS,), "float32", scope="global")  # scores of one page
                if QW > 0:
                    tmp = T.alloc_buffer((VL,), "float32", scope="global")
                else:
                    tmp = T.meta_var(None)
                st = T.alloc_buffer((3,), "float32", scope="global")  # running max, denom, tile max
                if load_query is not None:
                    load_query(q, qs, bi, ti, h)
                for d in T.vectorized(DV):
                    acc[d] = T.float32(0)
                st[0] = T.float32(NEG)
                st[1] = T.float32(0)
                for pg in range(lo // PS, p // PS + 1):
                    page = T.Bind(T.Cast("int64", page_table[bi, pg]))
                    st[2] = T.float32(NEG)
                    for jj in range(PS):
                        s[jj] = T.float32(NEG)
                        if pg * PS + jj >= lo and pg * PS + jj <= p:
                            score(q, kv, qs, tmp, s, bi, ti, h, kvh, page, jj)
                            if CAP > 0:
                                s[jj] = T.float32(CAP) * T.tanh(s[jj] * T.float32(1.0 / CAP))
                            if alibi:
                                s[jj] = s[jj] + slopes[h] * T.Cast("float32", pg * PS + jj - p)
                            st[2] = T.max(st[2], s[jj])
                    m_new = T.Bind(T.max(st[0], st[2]))
                    corr = T.Bind(T.exp(st[0] - m_new))
                    st[1] = st[1] * corr
                    for d in T.vectorized(DV):
                        acc[d] = acc[d] * corr
                    for jj in range(PS):
                        if pg * PS + jj >= lo and pg * PS + jj <= p:
                            e = T.Bind(T.exp(s[jj] - m_new))
                            st[1] = st[1] + e
                            accumulate(kv, acc, e, kvh, page, jj)
                    st[0] = m_new
                inv = T.Bind(T.float32(1) / st[1])
                for d in T.vectorized(DV):
                    out[bi, ti, h, d] = acc[d] * inv

    return body


def head_major_reader(
    head_dim: int, scale: float, load: Callable[..., Any], token_scale: Callable[..., Any] | None = None
) -> CacheReader:
    """Reader of a cache [pages, 2 (k, v), kv_heads, page_size, head_dim], in fp32 or in codes.

    ``load(kv, which, page, kvh, jj, d)`` is the stored element as f32 (which: 0 keys, 1 values);
    ``token_scale(kv, which, page, kvh, jj)``, if given, the scale of that token's row: it is folded
    into the key's score and into the value's softmax weight, never into the head_dim elements.
    The query is pre-scaled once; a score is a dot product in ``lanes`` partial sums.
    """
    D = head_dim
    VL = 16 if D % 16 == 0 else (8 if D % 8 == 0 else 1)  # dot-product vector lanes
    ND = D // VL
    scale = float(scale)

    @T.macro
    def load_query(q, qs, bi, ti, h):
        for d in T.vectorized(D):
            qs[d] = q[bi, ti, h, d] * T.float32(scale)

    @T.macro
    def score(q, kv, qs, tmp, s, bi, ti, h, kvh, page, jj):
        for v in T.vectorized(VL):
            tmp[v] = T.float32(0)
        for d0 in range(ND):
            for v in T.vectorized(VL):
                tmp[v] = tmp[v] + qs[d0 * VL + v] * load(kv, 0, page, kvh, jj, d0 * VL + v)
        for v in range(VL):
            s[jj] = T.if_then_else(v == 0, tmp[0], s[jj] + tmp[v])
        if token_scale is not None:
            s[jj] = s[jj] * token_scale(kv, 0, page, kvh, jj)

    @T.macro
    def accumulate(kv, acc, e, kvh, page, jj):
        if token_scale is not None:
            ev = T.Bind(e * token_scale(kv, 1, page, kvh, jj))
        else:
            ev = T.meta_var(e)
        for d in T.vectorized(D):
            acc[d] = acc[d] + ev * load(kv, 1, page, kvh, jj, d)

    return CacheReader(width=D, score=score, accumulate=accumulate, load_query=load_query, query_width=D, lanes=VL)


def paged_append_body(page_size: int, write: Any) -> Any:
    """Macro ``body(src, cache, page_table, positions, b, t)``: store each token's rows in its page.

    Token (bi, ti) at p = positions[bi, ti] goes to page page_table[bi, p // page_size], slot
    p % page_size; p < 0 (padding) is skipped. ``write(src, cache, bi, ti, page, slot)`` stores it.
    """
    PS = page_size

    @T.macro
    def body(src, cache, page_table, positions, b, t):
        for task in T.parallel(b * t):
            bi = T.Bind(task // t)
            ti = T.Bind(task % t)
            p = T.Bind(T.Cast("int64", positions[bi, ti]))
            if p >= 0:
                page = T.Bind(T.Cast("int64", page_table[bi, p // PS]))
                write(src, cache, bi, ti, page, p % PS)

    return body
