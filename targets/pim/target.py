"""Target `pim`: an H100-class GPU with PIM-enabled HBM3 stacks, simulated.

`PimTarget.build(graph)` does two things:
- functional execution: the program is built as the CPU target builds it (`PimTarget` is a `CpuTarget`),
  so a `pim` build computes exactly what a `cpu` build computes (placement is only an annotation);
- simulation: `place-pim` annotates each op (unless the graph already carries placements), and
  `timeline()` gives the simulated decode step, GPU-only and GPU+PIM: time and energy per op, per layer
  and per token (`kiln.targets.pim.cost`). The result is attached as `BuildResult.timeline` and summarized
  in `BuildResult.target["simulated"]`.

`write_report(...)` draws the plots (matplotlib, Agg backend, PNG).
"""

from __future__ import annotations

import os
from typing import Any

from kiln.entry import EntryPoint
from kiln.ir import Graph
from kiln.targets.base import BuildResult
from kiln.targets.cpu.target import CpuTarget

from .cost import StepResult
from .graph import simulate_graph
from .hw import DEFAULT, PimHardware


class PimTarget(CpuTarget):
    name = "pim"
    capabilities = (CpuTarget.capabilities - {"tensor-parallel"}) | {"simulated"}
    pass_modules = ("kiln.targets.pim.place_pim",)

    def __init__(
        self, batch: int = 1, context: int = 2048, spec: int = 0, hw: PimHardware | None = None, policy: str = "auto"
    ) -> None:
        super().__init__()
        self.batch, self.context, self.spec = int(batch), int(context), int(spec)
        self.hw = hw or DEFAULT
        self.policy = policy

    def describe(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "simulated": True,
            "hw_version": self.hw.version,
            "variant": self.hw.variant,
            "decode": {"batch": self.batch, "context": self.context, "spec": self.spec},
            "functional": super().describe(),
        }

    def place(self, graph: Graph) -> Graph:
        if any("placement" in n.attrs for n in graph.nodes):
            return graph
        from .place_pim import place_pim

        return place_pim(graph, batch=self.batch, context=self.context, spec=self.spec, policy=self.policy, hw=self.hw)

    def timeline(
        self, graph: Graph, batch: int | None = None, context: int | None = None, spec: int | None = None
    ) -> dict[str, StepResult]:
        """Simulated decode step, GPU-only ("gpu") and with the offload rule ("pim")."""
        b = self.batch if batch is None else batch
        c = self.context if context is None else context
        s = self.spec if spec is None else spec
        same = (b, c, s) == (self.batch, self.context, self.spec)
        return {
            "gpu": simulate_graph(graph, b, c, s, self.hw, "gpu"),
            "pim": simulate_graph(graph, b, c, s, self.hw, "auto", use_annotations=same),
        }

    def build(self, graph: Graph, entry_points: dict[str, EntryPoint] | None = None) -> BuildResult:
        g = self.place(graph)
        res = super().build(g, entry_points)
        tl = self.timeline(g)
        res.target = dict(
            self.describe(),
            simulated={
                k: {
                    "step_s": v.time_s,
                    "step_j": v.energy_j,
                    "tokens_per_s": v.tokens_per_s,
                    "j_per_token": v.j_per_token,
                }
                for k, v in tl.items()
            },
        )
        res.timeline = tl
        return res


TARGET = PimTarget


# -- report ---------------------------------------------------------------------------------------------------------


def _plt():
    from kiln.plots import pyplot  # matplotlib is the extra `plots`: a clear error names the install

    return pyplot()


def plot_breakdown(tl: dict[str, StepResult], path: str, title: str = "") -> str:
    """Stacked bars: decode-step time and energy by op kind and placement, GPU-only vs GPU+PIM."""
    plt = _plt()
    keys = sorted({k for r in tl.values() for k in r.breakdown() if k != "pipeline overlap"})
    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for ax, metric, scale, unit in ((axes[0], "time_s", 1e3, "ms"), (axes[1], "energy_j", 1.0, "J")):
        names = list(tl)
        bottom = [0.0] * len(names)
        for k in keys:
            vals = [tl[n].breakdown().get(k, {}).get(metric, 0.0) * scale for n in names]
            ax.bar(names, vals, bottom=bottom, label=k)
            bottom = [a + v for a, v in zip(bottom, vals)]
        if metric == "time_s":
            ov = [-tl[n].overlap_s * scale for n in names]
            if any(ov):
                ax.bar(names, ov, color="none", edgecolor="k", hatch="//", label="pipeline overlap (-)")
        ax.set_ylabel(f"{metric.split('_')[0]} per decode step ({unit})")
    axes[1].legend(fontsize=7)
    fig.suptitle(title or "decode step: GPU-only vs GPU+PIM")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_placement(step: StepResult, path: str, title: str = "") -> str:
    """Per-op time of one layer (and the head), colored by placement."""
    plt = _plt()
    layer0 = next((o.layer for o in step.ops if o.layer is not None), None)
    ops = [o for o in step.ops if (o.layer == layer0 or o.layer is None) and o.kind != "view"]
    fig, ax = plt.subplots(figsize=(10, 0.3 * len(ops) + 1.5))
    colors = {"gpu": "tab:blue", "pim": "tab:orange"}
    ax.barh([o.name for o in ops], [o.time_s * 1e6 for o in ops], color=[colors[o.placement] for o in ops])
    for i, o in enumerate(ops):
        ax.text(o.time_s * 1e6, i, f" {o.placement}", va="center", fontsize=7)
    ax.invert_yaxis()
    ax.set_xlabel("simulated time (us)")
    ax.set_title(title or f"placement per op (layer {layer0} and head); orange = PIM")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_speedup(
    series: dict[str, tuple[list, list]],
    xlabel: str,
    path: str,
    title: str = "",
    ylabel: str = "speedup GPU+PIM / GPU-only",
    logx: bool = True,
) -> str:
    plt = _plt()
    fig, ax = plt.subplots(figsize=(6, 4))
    for label, (xs, ys) in series.items():
        ax.plot(xs, ys, marker="o", label=label)
    if logx:
        ax.set_xscale("log", base=2)
    ax.axhline(1.0, color="grey", lw=0.8)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def write_report(tl: dict[str, StepResult], out: str, name: str = "model") -> list[str]:
    os.makedirs(out, exist_ok=True)
    return [
        plot_breakdown(tl, os.path.join(out, f"{name}_breakdown.png"), f"{name}: decode step"),
        plot_placement(tl["pim"], os.path.join(out, f"{name}_placement.png")),
    ]
