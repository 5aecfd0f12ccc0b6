"""Hardware description of the simulated `pim` target: an H100-class GPU whose HBM3 stacks are PIM-enabled.

One frozen, versioned dataclass (`PimHardware`) holds every number the cost model uses. Each field carries
its source in `dataclasses.field(metadata={"source": ...})`; `PimHardware.sources()` lists them. A config is
validated when it is built: a non-positive size/time/energy, a utilisation outside (0, 1], or an unknown PIM
placement variant raises `PimConfigError` naming the field at fault (`err.field`).

Sources, abbreviated below:
  [AttAcc]  Park et al., "AttAcc! Unleashing the Power of PIM for Batched Transformer-based Generative Model
            Inference", ASPLOS'24, and its simulator (scale-snu/attacc_simulator: src/config.py, devices.py,
            ramulator_wrapper.py, HBM3-PIM timing presets).
  [HBM-PIM] Lee et al., "Hardware Architecture and Software Stack for PIM Based on Commercial DRAM Technology"
            (Samsung HBM-PIM / FIMDRAM), ISCA'21; Kwon et al., ISSCC'21.
  [FGDRAM]  O'Connor et al., "Fine-Grained DRAM", MICRO'17 (per-bit energy of each DRAM data-path segment).
  [H100]    NVIDIA H100 SXM5 datasheet / DGX H100 whitepaper.
  [JESD238] JEDEC HBM3 standard (organisation: 16 channels x 2 pseudo-channels, 1 KB page).
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields, replace
from typing import Any

VARIANTS = ("bank", "bankgroup", "buffer")


class PimConfigError(ValueError):
    """An invalid hardware configuration; `field` names the parameter at fault."""

    def __init__(self, field_name: str, message: str) -> None:
        super().__init__(f"PimHardware.{field_name}: {message}")
        self.field = field_name


def _p(default: Any, source: str, kind: str = "positive"):
    return field(default=default, metadata={"source": source, "kind": kind})


@dataclass(frozen=True)
class PimHardware:
    """Per-GPU hardware: the GPU, its PIM-enabled HBM3 stacks, and the GPU-to-GPU link (for tensor parallelism)."""

    version: str = _p("attacc-h100-hbm3pim/1", "kiln: bump when any default below changes", "str")

    # -- GPU --------------------------------------------------------------------------------------------------
    gpu_peak_flops: float = _p(989.4e12, "[H100] dense fp16 tensor-core FLOP/s (SXM5); [AttAcc] config.py")
    gpu_compute_util: float = _p(0.8, "[AttAcc] config.py SCALING_FACTOR MAX_COMPUTE_UTIL", "fraction")
    gpu_mem_util: float = _p(0.85, "[AttAcc] config.py SCALING_FACTOR MAX_OFF_MEM_BW_UTIL", "fraction")
    gpu_kernel_overhead_s: float = _p(
        2.0e-6,
        "kiln estimate: launch + ramp/tail of one GPU kernel on H100 (CUDA-graph launch ~2 us); "
        "AttAcc fits 6.9/8.3 us fixed costs for norm/activation kernels on A100 (devices.py)",
        "nonneg",
    )

    # -- memory: HBM3 stacks (each also the PIM device) ---------------------------------------------------------
    stacks: int = _p(5, "[H100] 5 active HBM3 stacks; [AttAcc] config.py NUM_HBM")
    stack_bw: float = _p(670.4e9, "[AttAcc] config.py 670.4 GB/s per stack (5 x 670.4 = 3352 GB/s = [H100])")
    pch_per_stack: int = _p(32, "[JESD238] 16 channels x 2 pseudo-channels")
    banks_per_pch: int = _p(
        32, "[AttAcc] HBM3_8Gb_2R: 2 ranks (SIDs) x 4 bank groups x 4 banks per pseudo-channel (1024 banks per stack)"
    )
    bankgroups_per_pch: int = _p(8, "[AttAcc] 2 ranks x 4 bank groups")
    column_bytes: int = _p(32, "[HBM-PIM] one 256-bit column per access (burst of 32 B per pseudo-channel)")
    macs_per_column: int = _p(16, "[HBM-PIM] 16-lane fp16 SIMD MAC per bank: 16 MACs per 32-byte column")
    row_bytes: int = _p(1024, "[JESD238] 1 KB page per bank per pseudo-channel")
    tck_ns: float = _p(0.769, "[AttAcc] ramulator_wrapper.py tCK = 0.769 ns (HBM3 5.2 Gb/s)")
    nrcd: int = _p(19, "[AttAcc] HBM3_5.2Gbps timing preset, nRCD (cycles)")
    nrp: int = _p(19, "[AttAcc] HBM3_5.2Gbps timing preset, nRP (cycles)")
    nccd_ab: int = _p(6, "[AttAcc] HBM3_5.2Gbps preset: all-bank column-to-column delay with the power limit (cycles)")
    nccd_ab_nopl: int = _p(4, "[AttAcc] HBM3_5.2Gbps_NPC preset: nCCD_AB without the power limit (cycles)")
    nccd_s: int = _p(
        2,
        "[JESD238] tCCD_S = 2 cycles: one 32 B column per pseudo-channel per 2 cycles "
        "(= 670.4 GB/s / 32 pseudo-channels)",
    )
    nccd_bg: int = _p(
        2,
        "[AttAcc] config.py BW_SCALE: bank-group PIM at 8x external bandwidth = 8 bank-group units x 32 B per 2 cycles",
    )
    mode_switch_cycles: int = _p(
        152,
        "[HBM-PIM] entering SB->AB->AB-PIM and leaving takes ACT/PRE pairs to reserved "
        "rows: kiln charges 4 x (nRCD + nRP) per PIM kernel",
    )
    power_limit: bool = _p(
        True, "[AttAcc] --powerlimit: all-bank MACs at nCCD_AB=6 to stay in the HBM power budget", "bool"
    )
    variant: str = _p("bank", "[AttAcc] --pim bank|bg|buffer: where the MAC units sit", "variant")
    dtype_bytes: int = _p(2, "[AttAcc] W16A16 (fp16 weights, activations and KV cache)")

    # -- what lives in PIM memory --------------------------------------------------------------------------------
    kv_in_pim: bool = _p(True, "[AttAcc] the KV cache is stored in the PIM-enabled HBM", "bool")
    weights_in_pim: bool = _p(
        True,
        "kiln: the GPU's own HBM is PIM-enabled, so FC weights are PIM-resident too "
        "(AttAcc keeps them in plain GPU HBM: set False to model that)",
        "bool",
    )
    pipeline_attention: bool = _p(
        True, "[AttAcc] --pipeopt: head-wise pipelining of PIM attention with the GPU's QKV/output projections", "bool"
    )

    # -- interconnect (tensor parallelism) --------------------------------------------------------------------------
    link_bw: float = _p(450e9, "[H100] NVLink4 900 GB/s bidirectional = 450 GB/s per direction")
    collective_step_s: float = _p(
        6.06e-6, "[AttAcc] devices.py: fixed 6.06 us per all-reduce step, fitted to NCCL on DGX A100"
    )

    # -- energy -----------------------------------------------------------------------------------------------------
    e_gpu_dram_pj_b: float = _p(
        28.7,
        "[FGDRAM] via [AttAcc] config.py: cell 0.11+0.44, column path 1.01+1.23, "
        "TSV 0.5, interposer 0.3 pJ/bit = 28.7 pJ/B",
    )
    e_gpu_onchip_pj_b: float = _p(
        3.68, "[AttAcc] config.py: L2 0.3 + L1 0.16 pJ/bit = 3.68 pJ per byte streamed through the GPU's caches"
    )
    e_pim_bank_pj_b: float = _p(4.4, "[FGDRAM] cell only (0.11+0.44 pJ/bit) for a MAC next to the bank")
    e_pim_bankgroup_pj_b: float = _p(12.5, "[FGDRAM] cell + column path to the bank-group mux (0.11+0.44+1.01 pJ/bit)")
    e_pim_buffer_pj_b: float = _p(26.3, "[FGDRAM] cell + column path + TSV (0.11+0.44+1.01+1.23+0.5 pJ/bit)")
    e_vector_io_pj_b: float = _p(
        24.3,
        "[AttAcc] config.py PIM io: 0.3+0.5+1.23+1.01 pJ/bit for vectors moved "
        "between the GPU/buffer die and the banks",
    )
    e_mac_pj: float = _p(0.32, "[AttAcc] config.py alu: 0.32 pJ per fp16 MAC (GPU and PIM)")
    e_link_pj_b: float = _p(10.4, "[AttAcc] config.py comm: 1.3 pJ/bit NVLink")

    def __post_init__(self) -> None:
        for f in fields(self):
            v, kind = getattr(self, f.name), f.metadata["kind"]
            if kind == "str":
                if not isinstance(v, str) or not v:
                    raise PimConfigError(f.name, f"must be a non-empty string, got {v!r}")
            elif kind == "bool":
                if not isinstance(v, bool):
                    raise PimConfigError(f.name, f"must be True or False, got {v!r}")
            elif kind == "variant":
                if v not in VARIANTS:
                    raise PimConfigError(
                        f.name, f"unknown PIM placement variant {v!r}; choose one of {', '.join(VARIANTS)}"
                    )
            else:
                if isinstance(v, bool) or not isinstance(v, (int, float)) or v != v:
                    raise PimConfigError(f.name, f"must be a number, got {v!r}")
                if f.type in ("int", int) and int(v) != v:
                    raise PimConfigError(f.name, f"must be an integer, got {v!r}")
                if kind == "positive" and v <= 0:
                    raise PimConfigError(f.name, f"must be > 0, got {v!r}")
                if kind == "nonneg" and v < 0:
                    raise PimConfigError(f.name, f"must be >= 0, got {v!r}")
                if kind == "fraction" and not 0 < v <= 1:
                    raise PimConfigError(f.name, f"must be in (0, 1], got {v!r}")
        if self.row_bytes % self.column_bytes:
            raise PimConfigError("row_bytes", f"{self.row_bytes} is not a multiple of column_bytes={self.column_bytes}")

    # -- derived quantities ---------------------------------------------------------------------------------------
    @property
    def ext_bw(self) -> float:
        """External (GPU-visible) bandwidth of all stacks, bytes/s."""
        return self.stacks * self.stack_bw

    @property
    def pch_total(self) -> int:
        return self.stacks * self.pch_per_stack

    @property
    def pch_bw(self) -> float:
        """External bandwidth of one pseudo-channel (vector broadcast and read-out go through it)."""
        return self.stack_bw / self.pch_per_stack

    @property
    def units_per_pch(self) -> int:
        """MAC units per pseudo-channel for the placement variant."""
        return {"bank": self.banks_per_pch, "bankgroup": self.bankgroups_per_pch, "buffer": 1}[self.variant]

    @property
    def unit_interval(self) -> int:
        """Cycles between two column reads of one MAC unit."""
        if self.variant == "bank":
            return self.nccd_ab if self.power_limit else self.nccd_ab_nopl
        return self.nccd_bg if self.variant == "bankgroup" else self.nccd_s

    @property
    def e_pim_pj_b(self) -> float:
        return {"bank": self.e_pim_bank_pj_b, "bankgroup": self.e_pim_bankgroup_pj_b, "buffer": self.e_pim_buffer_pj_b}[
            self.variant
        ]

    @property
    def cols_per_row(self) -> int:
        return self.row_bytes // self.column_bytes

    @property
    def pim_peak_bw(self) -> float:
        """Internal operand bandwidth with every MAC unit streaming (no row switches), bytes/s."""
        return self.pch_total * self.units_per_pch * self.column_bytes / (self.unit_interval * self.tck_ns * 1e-9)

    @property
    def pim_stream_bw(self) -> float:
        """Internal bandwidth over long streams: one row activation (nRCD + nRP) per `cols_per_row` columns."""
        busy = self.cols_per_row * self.unit_interval
        return self.pim_peak_bw * busy / (busy + self.nrcd + self.nrp)

    @property
    def gpu_eff_bw(self) -> float:
        return self.ext_bw * self.gpu_mem_util

    @property
    def break_even_reuse(self) -> float:
        """Reuse (input vectors per operand byte) at which PIM and the GPU take equally long on a memory-resident
        operand: PIM spends one MAC slot per reuse per column, the memory-bound GPU reads the operand once."""
        return self.pim_stream_bw / self.gpu_eff_bw

    def with_(self, **changes: Any) -> PimHardware:
        return replace(self, **changes)

    @classmethod
    def sources(cls) -> dict[str, str]:
        return {f.name: f.metadata["source"] for f in fields(cls)}

    def to_json(self) -> dict[str, Any]:
        return {f.name: getattr(self, f.name) for f in fields(self)}


DEFAULT = PimHardware()
