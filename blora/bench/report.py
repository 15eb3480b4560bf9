"""The benchmark's Markdown table and its plot (tok/s against the number of distinct adapters)."""

from __future__ import annotations

from pathlib import Path

from blora.bench.systems import LABELS


def _references(rows: list[dict], adapters: int) -> dict[str, float | None]:
    """Per system, the tok/s its ratio column divides by: base-only rows, PEFT mixed at ``adapters``."""
    return {
        s: next((r["tok_s"] for r in rows if r["system"] == s and r["adapters"] in (0, adapters)), None)
        for s in LABELS
    }


def table(rows: list[dict], adapters: int = 16) -> str:
    """Markdown table, per dtype in the order measured; ratios to transformers, engine base-only and
    PEFT mixed with ``adapters`` adapters, from the same run."""
    lines = [
        "| dtype | system | tok/s | vs transformers | vs engine base | vs PEFT mixed | TTFT (s) | peak RSS (MiB) |",
        "|---|---|---:|---:|---:|---:|---:|---:|",
    ]
    for dtype in dict.fromkeys(r["dtype"] for r in rows):
        sub = [r for r in rows if r["dtype"] == dtype]
        ref = _references(sub, adapters)
        for r in sub:
            ratios = [
                f"{r['tok_s'] / ref[s]:.2f}x" if ref[s] else "-"
                for s in ("transformers", "engine", "peft-mixed")
            ]
            lines.append(
                f"| {dtype} | {r['label']} | {r['tok_s']:.1f} | {' | '.join(ratios)} | {r['ttft_s']:.2f} | "
                f"{r['peak_rss_mb']:.0f} |"
            )
    return "\n".join(lines)


def plot(rows: list[dict], path: Path, title: str = "SmolLM2-135M") -> bool:
    """Draw tok/s against distinct adapters (one panel per dtype) to ``path``; False without matplotlib."""
    try:
        import matplotlib
    except ImportError:
        return False
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    dtypes = list(dict.fromkeys(r["dtype"] for r in rows))
    fig, axes = plt.subplots(1, len(dtypes), figsize=(6 * len(dtypes), 4), squeeze=False)
    for ax, dtype in zip(axes[0], dtypes, strict=True):
        _plot_dtype(ax, [r for r in rows if r["dtype"] == dtype])
        ax.set_title(f"{title}, {dtype}")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return True


def _plot_dtype(ax, rows: list[dict]) -> None:
    for system, style in (("engine-lora", "o-"), ("peft-mixed", "s--")):
        pts = sorted((r["adapters"], r["tok_s"]) for r in rows if r["system"] == system)
        if pts:
            ax.plot(*zip(*pts, strict=True), style, label=LABELS[system].removesuffix(", {k}"))
    for system, style in (("engine", ":"), ("transformers", "-.")):
        base = [r["tok_s"] for r in rows if r["system"] == system]
        if base:
            ax.axhline(base[0], linestyle=style, color="gray", label=LABELS[system])
    ax.set_xscale("log", base=2)
    ax.set_xlabel("distinct adapters in the batch")
    ax.set_ylabel("generated tok/s")
    ax.legend(fontsize=8)
