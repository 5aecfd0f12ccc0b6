"""The paged latent cache of `mla_attention`: its layout and the cached op that reads and appends to it.

convert-mla makes the op and kv-cache lays out its cache; the layout belongs to neither pass, so it
lives here rather than in either pass.
"""

from __future__ import annotations

import sympy

from kiln.ir import Graph, Node, TensorType


def cache_mla(
    g: Graph, mla: Node, layer: int, page_size: int, page_table: Node, positions: Node, pages: sympy.Expr, name: str
) -> dict:
    """kv-cache's rule for `mla_attention`: a paged latent cache [pages, page_size, r + kv_heads * R]."""
    q_nope, q_rope, c, kr = mla.inputs[:4]
    r, kvh, rd = int(c.type.shape[-1]), int(kr.type.shape[1]), int(kr.type.shape[3])
    cache = g.add_input(name, TensorType((pages, sympy.Integer(page_size), sympy.Integer(r + kvh * rd)), "float32"))
    ca = g.add(
        "cached_mla_attention",
        mla.inputs + [cache, page_table, positions],
        {k: v for k, v in mla.attrs.items()} | {"layer": layer},
        name=f"cached_mla_attention_{layer}",
        before=mla,
        source=mla.source,
    )
    g.replace_all_uses(mla, ca)
    g.nodes.remove(mla)
    return {
        "kv_heads": kvh,
        "head_dim": int(q_nope.type.shape[3]) + int(q_rope.type.shape[3]),
        "num_heads": int(q_nope.type.shape[1]),
        "window": mla.attrs["window"],
        "mla_rank": r,
        "rope_dims": rd,
        "layout": "[pages, page_size, rank + kv_heads * rope_dims]",
    }
