"""The kiln op set: one record (`OpDef`) per op, in `OPS`.

Core ops mirror tensor algebra (core.py, shape.py); LLM-level ops (`rms_norm`, `rope`, `gated_mlp`
in nn.py; `attention`, `cached_attention`, latent attention in attention.py; `qweight`, `quant_act`
in quant.py) are created by recognizer and compression passes; the state-space ops (`selective_scan`,
`causal_conv1d` and their cached forms, ssm.py) by the tracer and kv-cache; the collectives `all_reduce`
and `all_gather` (collective.py) by shard-tensor-parallel. base.py holds the record, the kinds, the
annotation keys any node may carry, and the dimension helpers. Importing this package declares every op.
"""

from __future__ import annotations

from . import collective, core, moe, nn, quant, routing, shape, ssm  # noqa: F401  (declare the ops)
from .attention import (  # noqa: F401
    AttentionAttrs,
    CachedAttentionAttrs,
    CachedMlaAttentionAttrs,
    MlaAttentionAttrs,
    SdpaAttrs,
    alibi_bias,
    attention_reference,
    cached_attention_reference,
    cached_mla_attention_reference,
    kv_fake_quant,
    mla_attention_reference,
)
from .base import (  # noqa: F401
    ANNOTATIONS,
    DTYPE_BYTES,
    KINDS,
    OPS,
    AttrError,
    Input,
    NoAttrs,
    OpDef,
    ShapeError,
    broadcast_shapes,
    bytes_of,
    define,
    evaluate,
    find_rule,
    flops_of,
    infer_type,
    io_bytes,
    norm_dim,
    numel,
    ops_of_kind,
    promote,
    read_bytes,
    register_rule,
    same,
    tensor_bytes,
    torch_dtype,
    torch_dtype_name,
)
from .collective import AllGatherAttrs, AllReduceAttrs  # noqa: F401
from .core import AtenAttrs, AxisAttrs, CastAttrs, ConstAttrs, GeluAttrs, ReduceAttrs, _rebuild  # noqa: F401
from .nn import GatedMlpAttrs, LayerNormAttrs, RmsNormAttrs, rotate_half  # noqa: F401
from .quant import QWeightAttrs  # noqa: F401
from .shape import ArangeAttrs, FullAttrs, PermuteAttrs, ShapeAttrs, SliceAttrs, _slice_bounds  # noqa: F401
