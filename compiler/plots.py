"""Plots (matplotlib, Agg backend, PNG): `kiln inspect --plot` and the pim target's report.

matplotlib is the optional extra `plots`; a missing one is a clear error naming the install, never an
ImportError from deep inside.
"""

from __future__ import annotations

from typing import Any

from .errors import KilnError

GIB = 2**30
# memory sizes and contexts the KV-budget panel is drawn for
BUDGETS_GIB = (1, 4, 16, 64)
CONTEXTS = (512, 2048, 8192, 32768, 131072)


def pyplot() -> Any:
    """matplotlib.pyplot on the Agg backend (files only: works without a display)."""
    try:
        import matplotlib
    except ImportError as e:
        raise KilnError("plots need matplotlib, which is not installed: pip install 'kiln[plots]'") from e
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def kv_batch(kv: dict[str, Any], budget_bytes: int, context: int) -> int:
    """Sequences of `context` tokens that fit `budget_bytes` of KV cache as built (whole pages each)."""
    page = int(kv["page_size"])
    page_bytes = int(kv["bytes_per_token"]) * page
    return (budget_bytes // page_bytes) // -(-context // page) if page_bytes else 0


def plot_artifact(m: dict[str, Any], path: str) -> str:
    """PNG at `path`: parameter bytes and FLOPs per token after each pass (when the manifest records its
    passes), and the KV budget: max batch by context for a few memory sizes."""
    plt = pyplot()
    passes = m.get("passes") or []
    kv = m.get("kv_cache") or {}
    panels = (2 if passes else 0) + (1 if kv.get("bytes_per_token") else 0)
    if not panels:
        raise KilnError("this artifact's manifest records neither passes nor a KV cache: nothing to plot")
    fig, axes = plt.subplots(1, panels, figsize=(5 * panels, 4), squeeze=False)
    axes = list(axes[0])
    if passes:
        names = ["traced"] + [r["name"] for r in passes]
        mb = [passes[0]["param_bytes_before"] / 1e6] + [r["param_bytes_after"] / 1e6 for r in passes]
        mfl = [passes[0]["flops_per_token_before"] / 1e6] + [r["flops_per_token_after"] / 1e6 for r in passes]
        for ax, vals, label in ((axes.pop(0), mb, "parameter MB"), (axes.pop(0), mfl, "MFLOPs per token")):
            ax.bar(range(len(names)), vals, color=["grey"] + ["tab:blue"] * len(passes))
            ax.set_xticks(range(len(names)), names, rotation=60, ha="right", fontsize=7)
            ax.set_ylabel(f"{label} after the pass")
    if kv.get("bytes_per_token"):
        ax = axes.pop(0)
        for gib in BUDGETS_GIB:
            ax.plot(CONTEXTS, [max(kv_batch(kv, gib * GIB, c), 0.5) for c in CONTEXTS], marker="o", label=f"{gib} GiB")
        ax.set_xscale("log", base=2)
        ax.set_yscale("log", base=2)
        ax.set_xlabel("context (tokens)")
        ax.set_ylabel("max batch (0 drawn at 0.5)")
        ax.set_title(f"KV budget: {kv['bytes_per_token']} B/token, {kv.get('dtype')}", fontsize=9)
        ax.legend(fontsize=7)
    fig.suptitle(f"kiln artifact: {m.get('name', '?')} ({m.get('target', {}).get('name', '?')})")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def plot_frontier(res: Any, path: str) -> str:
    """PNG at `path`: held-out perplexity against weight bytes for every plan `kiln tune` evaluated (a
    TuneResult), the chosen one marked, the single-scheme builds beside them, the budget as a line."""
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(7, 4.5))
    pts = [c for c in res.candidates if c.ppl is not None]
    ok = [c for c in pts if c.within_budget]
    bad = [c for c in pts if not c.within_budget]
    for group, color, label in ((ok, "tab:blue", "candidate within budget"), (bad, "tab:grey", "candidate over")):
        if group:
            ax.scatter([c.weight_bytes / 1e6 for c in group], [c.ppl for c in group], c=color, s=18, label=label)
    for r in res.references:
        ax.scatter([r.weight_bytes / 1e6], [r.ppl], marker="s", s=40, c="tab:orange")
        ax.annotate(r.name, (r.weight_bytes / 1e6, r.ppl), fontsize=8, xytext=(4, 4), textcoords="offset points")
    c = res.chosen
    ax.scatter([c.weight_bytes / 1e6], [c.ppl], marker="*", s=220, c="tab:red", label=f"chosen ({res.objective})")
    budget = res.budget
    if budget.startswith("ppl+"):
        v = float(budget[4:].rstrip("%"))
        limit = res.ppl_fp32 * (1 + v / 100) if budget.endswith("%") else res.ppl_fp32 + v
        ax.axhline(limit, color="tab:red", lw=0.8, ls="--", label=f"budget {budget}")
    ys = [c.ppl for c in pts + list(res.references) if c.ppl]
    if ys and max(ys) > 1.5 * min(ys):  # a lossy single-scheme build would flatten the candidates
        ax.set_yscale("log")
    ax.set_xlabel("weight MB")
    ax.set_ylabel("held-out perplexity")
    ax.set_title(f"kiln tune: budget {budget}, objective {res.objective}", fontsize=10)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
