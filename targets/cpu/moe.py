"""CPU rule for `moe`: the router through Relax's softmax/top-k, the experts as one TE kernel that reads
only the k chosen experts' weight rows for each token (no gathered copy of the weights)."""

from __future__ import annotations

from tvm import relax, te, tirx

from kiln.ops import register_rule


def _act(name: str, v):
    if name == "silu":
        return v * tirx.sigmoid(v)
    if name == "gelu":
        return 0.5 * v * (1.0 + tirx.erf(v * 0.7071067811865476))
    # gelu_tanh: 0.5 v (1 + tanh(sqrt(2/pi) (v + 0.044715 v^3)))
    return 0.5 * v * (1.0 + tirx.tanh(0.7978845608028654 * (v + 0.044715 * v * v * v)))


def experts(x, ids, w, gate_up, down, act: str):
    """out[t] = sum_j w[t, j] * down[e] @ (act(gate[e] @ x[t]) * up[e] @ x[t]), e = ids[t, j]."""
    # x: [T, H]; ids, w: [T, k]; gate_up: [E, 2I, H]; down: [E, H, I]
    t_, h_ = x.shape
    k_ = ids.shape[1]
    inter = down.shape[2]
    rh = te.reduce_axis((0, h_), name="rh")
    proj = te.compute(
        (t_, k_, gate_up.shape[1]),
        lambda t, j, o: te.sum(x[t, rh] * gate_up[ids[t, j], o, rh], axis=rh),
        name="moe_gate_up",
    )  # [T, k, 2I]
    hid = te.compute(
        (t_, k_, inter), lambda t, j, i: _act(act, proj[t, j, i]) * proj[t, j, i + inter], name="moe_act"
    )  # [T, k, I]
    ri = te.reduce_axis((0, inter), name="ri")
    y = te.compute(
        (t_, k_, h_), lambda t, j, d: te.sum(hid[t, j, ri] * down[ids[t, j], d, ri], axis=ri), name="moe_down"
    )  # [T, k, H]
    rk = te.reduce_axis((0, k_), name="rk")
    return te.compute((t_, h_), lambda t, d: te.sum(y[t, rk, d] * w[t, rk], axis=rk), name="moe_sum")


@register_rule("cpu", "moe")
def _moe(f, n, xs):
    x, logits, gate_up, down = xs
    a = n.attrs
    probs = f.emit(relax.op.nn.softmax(logits, axis=-1))
    w = f.emit(relax.op.topk(probs, k=a["k"], axis=-1, ret_type="values", largest=True))
    ids = f.emit(relax.op.topk(probs, k=a["k"], axis=-1, ret_type="indices", largest=True, dtype="int64"))
    if a["renorm"]:
        w = f.emit(relax.op.divide(w, f.emit(relax.op.sum(w, axis=[-1], keepdims=True))))
    return f.bb.emit_te(experts, x, ids, w, gate_up, down, a["act"])
