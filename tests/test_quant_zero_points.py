"""Asymmetric zero points: codes by default (0 stays exact), floats over each group's true range with `_floatzero`."""

import math

import numpy as np
import pytest
import torch

from kiln.errors import KilnError
from kiln.passes import REGISTRY, run_counted
from kiln.passmgr import run_pipeline
from kiln.quant import dequantize, integer_zero, parse_scheme, rtn

BASE = "canonicalize,fuse-norms,fuse-rope,fuse-attention"


def sqnr_db(ref: torch.Tensor, x: torch.Tensor) -> float:
    return 10 * math.log10(float((ref**2).sum() / ((ref - x) ** 2).sum()))


@pytest.fixture(scope="module")
def real_weights() -> dict[str, torch.Tensor]:
    """256 rows of two SmolLM2-135M weights, read straight from the GGUF file: the token embedding
    (stored as Q8_0, so on no int4 grid) and a Q4_1 attention weight (a float-minimum grid of 32)."""
    from gguf import GGUFReader
    from gguf.quants import dequantize as gguf_dequantize

    from kiln.models import builtin_gguf

    tensors = {t.name: t for t in GGUFReader(builtin_gguf("smollm2-135m")).tensors}
    out = {}
    for name in ("token_embd.weight", "blk.0.attn_q.weight"):
        t = tensors[name]
        out[name] = torch.from_numpy(np.array(gguf_dequantize(t.data[:256], t.tensor_type), np.float32))
    return out


def test_scheme_names():
    s = parse_scheme("int4_g32_floatzero")
    assert (s.bits, s.group, s.sym, s.float_zero) == (4, 32, False, True)
    assert parse_scheme("int8_asym_floatzero").float_zero and not parse_scheme("int4_g32").float_zero
    assert integer_zero(s) == parse_scheme("int4_g32")
    assert integer_zero(parse_scheme("int8")) == parse_scheme("int8")
    with pytest.raises(KilnError, match="_floatzero sets the zero point of asymmetric schemes"):
        parse_scheme("int4_g32_sym_floatzero")
    with pytest.raises(KilnError, match="did you mean 'int4_g32_floatzero'"):
        parse_scheme("int4_g32_floatzeros")


@pytest.mark.parametrize("name,min_gain_db", [("int4_g32", 0.15), ("int4_g128", 0.03)])
def test_float_zero_points_beat_integer_ones_on_a_real_weight(real_weights, name, min_gain_db):
    """On the token embedding, measured gains are +0.25 dB (g32) and +0.06 dB (g128): small, as the
    integer rule only shifts the grid by up to s/2. Codes dequantize within s/2 of every weight and
    the ends of each group's range are on the grid."""
    w = real_weights["token_embd.weight"]
    new, old = parse_scheme(name + "_floatzero"), parse_scheme(name)
    q, s, z = rtn(w, new)
    assert not bool((z == torch.round(z)).all())  # float zero points
    wq = dequantize(q, s, z, new.group)
    gain = sqnr_db(w, wq) - sqnr_db(w, dequantize(*rtn(w, old), old.group))
    assert gain > min_gain_db, gain
    step = s.repeat_interleave(new.group, 1)[:, : w.shape[1]]
    assert bool(((wq - w).abs() <= step / 2 * (1 + 1e-4)).all())
    whole = w.shape[1] // new.group * new.group  # 576 = 4.5 x 128: the whole groups
    wg, dg = (t[:, :whole].reshape(256, -1, new.group) for t in (w, wq))
    torch.testing.assert_close(dg.amin(-1), wg.amin(-1), atol=1e-5, rtol=0)
    torch.testing.assert_close(dg.amax(-1), wg.amax(-1), atol=1e-5, rtol=0)


def test_a_float_minimum_grid_is_reproduced(real_weights):
    """A Q4_1 weight (4 bits, blocks of 32, float minimum) is on the int4 g32 grid of the float rule:
    its codes reproduce it to float precision, where the integer rule re-rounds it (about 21 dB)."""
    w = real_weights["blk.0.attn_q.weight"]
    s = parse_scheme("int4_g32_floatzero")
    assert sqnr_db(w, dequantize(*rtn(w, s), 32)) > 100
    assert sqnr_db(w, dequantize(*rtn(w, integer_zero(s)), 32)) < 25


def test_sparsified_weights_keep_exact_zeros(traced):
    """sparsify then quantize-weights with a _floatzero scheme: pruned weights fall back to integer zero
    points and stay exactly 0; the LM head (not pruned) keeps float ones."""
    g, _ = run_pipeline(traced["llama"], BASE + ",sparsify{ratio=0.5,pattern=2:4,method=magnitude}")
    q, counts = run_counted(REGISTRY["quantize-weights"], g, {"scheme": "int4_g32_floatzero"})
    assert counts["linear-int4_g32"] == 14 and counts["linear-int4_g32_floatzero"] == 1
    for n in q.find("qweight"):
        codes, scales, zeros = (q.params[i.attrs["name"]] for i in n.inputs)
        if n.attrs["scheme"] == "int4_g32":
            base = n.inputs[0].attrs["name"].removesuffix(".int4_g32.codes")
            w = dequantize(codes, scales, zeros, n.attrs["group"])
            assert int((g.params[base] == 0).sum()) > 0 and bool((w[g.params[base] == 0] == 0).all())
        else:
            assert not bool((zeros == torch.round(zeros)).all())


def test_packing_a_ragged_group_that_does_not_span_zero():
    """A float zero point lies outside the code range when a group does not span 0 (z < 0 for an
    all-positive group). The ragged last group's padding codes must still be codes: the CPU and CUDA
    packers accept them, and the real columns dequantize as the IR does."""
    from kiln.targets.cpu.layouts import BlockedQuant
    from kiln.targets.cuda.layouts import Quant

    torch.manual_seed(0)
    w = torch.randn(40, 80)
    w[:, 64:] = w[:, 64:].abs() + 0.5  # the last (ragged) group of 32 is all positive
    sch = parse_scheme("int4_g32_floatzero")
    q, s, z = rtn(w, sch)
    assert bool((z[:, -1] < 0).all())
    cpu = BlockedQuant(bits=4, group=32, sym=False).pack([q.numpy(), s.numpy(), z.numpy()])
    assert len(cpu) == 3 and cpu[0].shape[1] == 96  # padded to 3 whole groups
    cuda = Quant(bits=4, group=32, sym=False).pack([q.numpy(), s.numpy(), z.numpy()])
    assert len(cuda) == 3
    # CPU layout (qkernels.qweight_layout): codes[b, k, j] = q[32b + j, k] | q[32b + 16 + j, k] << 4, and
    # the value is f * scales + zs with f = 1 + q / 16: the real columns dequantize as the IR does
    codes = cpu[0][0].astype(np.int64)  # rows 0..31: [K, 16]
    got_q = np.concatenate([codes & 15, codes >> 4], 1).T  # [32, 96]
    assert np.array_equal(got_q[:, :80], q.numpy()[:32])
    f = 1 + got_q / 16.0
    got = f * np.repeat(cpu[1][0].T, 32, 1) + np.repeat(cpu[2][0].T, 32, 1)
    np.testing.assert_allclose(got[:, :80], dequantize(q, s, z, 32).numpy()[:32], rtol=1e-5, atol=1e-5)
