"""The recurrent half of kv-cache: state-space layers keep a fixed-size state per sequence, not pages.

A traced `selective_scan` (or `causal_conv1d`) runs over the whole sequence from a zero state; serving
needs prefill (a prompt chunk) and decode (one token) to continue where the sequence left off. Each
such op becomes its cached form over a state tensor with one row per *state slot*:

- `kv_cache_{i}_ssm [slots, H, P, N]` for the i-th scan, `kv_cache_{i}_conv [slots, W - 1, Ch]` for the
  i-th convolution (fp32, fixed size, no pages);
- `kv_cache_slots [pages]` (int32, the runtime writes it): the slot of the sequence whose first page is
  that page; a cached op finds its sequence's slot as `kv_cache_slots[page_table[b, 0]]`, so the entry
  points keep the signature of an attention model's.

Prefill runs the scan over the chunk and leaves the final state in the slot; decode runs one step.
Position 0 starts from a zero state (a slot needs no clearing between sequences); positions < 0 are
padding and leave the state alone. A state summarizes the whole prefix, so prefix caching (sharing
pages of a common prefix) does not apply to these layers, nor does rolling back rejected speculative
tokens: the manifest says so. Exact: prefill of a prompt equals the traced forward's rows.
"""

from __future__ import annotations

import sympy

from kiln.ir import Graph, Node, TensorType, sym

from .registry import count

SLOTS = sym("slots")
RECURRENT = ("selective_scan", "causal_conv1d")


def derive_states(g: Graph, page_table: Node, positions: Node, pages: sympy.Symbol) -> dict | None:
    """Turn every recurrent op of `g` into its cached form; returns the manifest's `state` entry, or None
    when the graph has no recurrent op."""
    ops = [n for n in g.nodes if n.op in RECURRENT]
    if not ops:
        return None
    slots = g.add_input("kv_cache_slots", TensorType((pages,), "int32"))
    layers: list[dict] = []
    per_seq = 0
    scans = convs = 0
    for n in ops:
        if n.op == "selective_scan":
            x, B = n.inputs[0].type.shape, n.inputs[3].type.shape
            shape: tuple = (SLOTS, x[2], x[3], B[3])  # [slots, H, P, N]
            state = g.add_input(f"kv_cache_{scans}_ssm", TensorType(shape, "float32"))
            required, optional = n.inputs[:5], n.inputs[5:]
            ins = list(required) + [state, slots, page_table, positions] + list(optional)
            name, kind, i = f"cached_selective_scan_{scans}", "ssm", scans
            scans += 1
        else:
            ch, w = n.inputs[1].type.shape
            shape = (SLOTS, w - 1, ch)  # [slots, W - 1, Ch]: the last W - 1 inputs
            state = g.add_input(f"kv_cache_{convs}_conv", TensorType(shape, "float32"))
            ins = list(n.inputs[:2]) + [state, slots, page_table, positions] + list(n.inputs[2:])
            name, kind, i = f"cached_causal_conv1d_{convs}", "conv", convs
            convs += 1
        c = g.add("cached_" + n.op, ins, dict(n.attrs), name=name, before=n, source=n.source)
        g.replace_all_uses(n, c)
        g.nodes.remove(n)
        nbytes = 4 * int(sympy.Mul(*shape[1:]))
        per_seq += nbytes
        layers.append({"index": i, "kind": kind, "shape": [int(d) for d in shape[1:]], "bytes": nbytes})
        count("cached-" + n.op.replace("_", "-"))
    return {
        "layers": layers,
        "bytes_per_sequence": per_seq,
        "dtype": "float32",
        "slot_table": "kv_cache_slots",
        "prefix_caching": False,  # a state summarizes its whole prefix: no page of it can be shared
        "speculation": False,  # a state cannot roll back rejected draft tokens
    }
