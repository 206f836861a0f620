"""PNG plot of the active-fraction section (matplotlib, optional)."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Optional

CURVES = (
    ("deq_ext_iteration_ms", "deq_ext iteration (f on active rows + passes)", "C0", "-"),
    ("deq_ext_passes_ms", "deq_ext fused passes", "C0", "--"),
    ("reference_passes_ms", "reference twin passes", "C2", "--"),
    ("torchdeq_iteration_ms", "torchdeq iteration (f on all rows + step)", "C3", "-"),
)


def plot_active_fraction(section: dict[str, Any], title: str, path: str) -> Optional[str]:
    """Write the plot to ``path``; returns None on success, else why it was skipped."""
    try:
        import matplotlib
        matplotlib.use("Agg")  # no display on benchmark machines
        import matplotlib.pyplot as plt
    except ImportError:
        return "matplotlib is not installed (pip install matplotlib)"
    points = section["points"]
    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    for key, label, color, style in CURVES:
        xs = [p["fraction"] for p in points if key in p]
        if xs:
            ax.plot(xs, [p[key] for p in points if key in p], style, color=color, marker="o",
                    label=label)
    z = section["sizes"]
    ax.set_xlabel("fraction of samples still active")
    ax.set_ylabel("ms per iteration")
    ax.set_title(f"{title}\nB={z['batch']} D={z['dim']} m={z['m']}", fontsize=9)
    ax.set_xlim(0, 1.05)
    ax.set_ylim(bottom=0)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return None
