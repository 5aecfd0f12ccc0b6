"""Typed weight layouts: how one field of an artifact's `weights` tuple is made from graph parameters.

A layout is a small frozen object owned by the target whose kernels read it (cpu: targets/cpu/layouts.py,
cuda: targets/cuda/layouts.py). It knows its manifest key (`key`, e.g. "q4g128a:1"), the shape and
dtype of its field, and how to pack its sources (numpy here; the cuda layout also packs with torch on a
GPU host). Quantized layouts come in families: the codes, scales and zero points of one weight are
parts 0, 1, 2 of one family, packed together once (`pack_fields`).

Only this module turns a manifest key back into a layout (`parse_layout`), through the parsers the
targets register, so the key format is written once per layout type.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any, ClassVar

import numpy as np

if TYPE_CHECKING:
    from kiln.targets.base import WeightSpec


@dataclass(frozen=True)
class Layout:
    """Base class: a field made from its sources as they are (`Raw`)."""

    part: int = 0  # which array of a multi-part family this field is
    compressed: ClassVar[bool] = False  # holds only a sparse weight's kept values: nothing to compress

    def key(self) -> str:
        raise NotImplementedError

    def family(self) -> Layout:
        """The layout with the part number cleared: fields of one family are packed together."""
        return replace(self, part=0)

    def pack(self, arrays: list[np.ndarray]) -> list[np.ndarray]:
        """Every part of the family, from the source arrays (in the spec's source order)."""
        raise NotImplementedError

    def dense_bytes(self, shape: tuple[int, ...], dtype: str) -> int:
        """What this field would take in the target's dense layout (the report compares compressed
        layouts with it); a dense layout is its own size."""
        return int(np.prod(shape)) * np.dtype(dtype).itemsize


@dataclass(frozen=True)
class Raw(Layout):
    """The parameter itself (biases, norm weights, rotary tables ...)."""

    def key(self) -> str:
        return "raw"

    def pack(self, arrays: list[np.ndarray]) -> list[np.ndarray]:
        return [arrays[0]]


RAW = Raw()


@dataclass(frozen=True)
class Cat(Layout):
    """Its sources concatenated along the first axis (the biases of linears run as one kernel)."""

    def key(self) -> str:
        return "cat"

    def pack(self, arrays: list[np.ndarray]) -> list[np.ndarray]:
        return [np.concatenate(arrays, axis=0)]


CAT = Cat()

_PARSERS: list[Callable[[str], Layout | None]] = [lambda k: {"raw": RAW, "cat": CAT}.get(k)]


def register_parser(parse: Callable[[str], Layout | None]) -> Callable[[str], Layout | None]:
    """A target registers how its layouts' keys read back (a parser returns None for other keys)."""
    _PARSERS.append(parse)
    return parse


def parse_layout(key: str) -> Layout:
    for p in _PARSERS:
        lay = p(key)
        if lay is not None:
            return lay
    raise ValueError(
        f"weight layout '{key}' is unknown to this kiln: the artifact comes from another version; rebuild it"
    )


@dataclass(frozen=True)
class QuantKey:
    """The parameters a quantized layout key carries: "<prefix>q<bits>g<group><s|a>:<part>"."""

    bits: int
    group: int
    sym: bool
    part: int

    def format(self, prefix: str = "") -> str:
        return f"{prefix}q{self.bits}g{self.group}{'s' if self.sym else 'a'}:{self.part}"

    @staticmethod
    def parse(key: str, prefix: str = "") -> QuantKey | None:
        if not key.startswith(prefix + "q") or ":" not in key:
            return None
        head, part = key[len(prefix) :].split(":")
        bits, rest = head[1:].split("g")
        return QuantKey(int(bits), int(rest[:-1]), rest[-1] == "s", int(part))


def padded_k(k: int, group: int) -> int:
    """The kernels want whole groups: a ragged last group (576 with 128) is padded with zero weights,
    and the input with zeros to match."""
    return -(-k // group) * group


def pad_codes(codes: Any, zeros: Any, group: int, bits: int) -> Any:
    """Codes [N, K] (numpy or torch) padded to whole groups with the last group's zero point as a code, so
    the padding dequantizes to 0 under an integer zero point. A float zero point is rounded and clamped
    to the code range (it lies outside when the group does not span 0): that padding is not 0, but the
    kernels multiply it by the zeros the input is padded with."""
    pad = padded_k(codes.shape[1], group) - codes.shape[1]
    if not pad:
        return codes
    fill = zeros[:, -1:].round().clip(0, (1 << bits) - 1)
    if isinstance(codes, np.ndarray):
        return np.concatenate([codes, np.repeat(fill, pad, axis=1).astype(codes.dtype)], axis=1)
    import torch

    return torch.cat([codes, fill.to(codes.dtype).expand(-1, pad)], 1)


def split_sources(arrays: list[Any]) -> tuple[Any, Any, Any]:
    """A quantized field's sources are codes..., scales..., zeros... (one of each per weight concatenated
    along the output rows): the three concatenated (numpy or torch)."""
    n = len(arrays) // 3
    cat: list[Any]  # numpy arrays or torch tensors, as the sources are
    if isinstance(arrays[0], np.ndarray):
        cat = [np.concatenate(arrays[j * n : (j + 1) * n], axis=0) for j in range(3)]
    else:
        import torch

        cat = [torch.cat(arrays[j * n : (j + 1) * n], 0) for j in range(3)]
    return cat[0], cat[1], cat[2]


def pack_fields(specs: list[WeightSpec], params: dict[str, Any]) -> dict[str, np.ndarray]:
    """Every field of `specs` (numpy) from the graph parameters (torch tensors); the parts of a family
    are packed once."""
    out: dict[str, np.ndarray] = {}
    packed: dict[tuple, list[np.ndarray]] = {}
    for s in specs:
        lay = parse_layout(s.transform)
        fam = (s.sources, lay.family())
        if fam not in packed:  # the parts of a family are adjacent: keep one family at a time
            packed = {fam: lay.pack([params[x].detach().cpu().contiguous().numpy() for x in s.sources])}
        out[s.name] = packed[fam][lay.part]
    return out


def materialize(spec: WeightSpec, params: dict[str, Any]) -> np.ndarray:
    """One weight field (numpy) from graph parameters (torch tensors)."""
    return pack_fields([spec], params)[spec.name]
