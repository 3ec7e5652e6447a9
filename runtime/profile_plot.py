"""Plots of profile rows: a Pareto PNG (matplotlib) and tokens/s bars in the terminal (plotext)."""

from __future__ import annotations

from pathlib import Path

from edgekit.errors import require
from edgekit.fsutil import atomic_file
from edgekit.runtime.profile_schema import ProfileRow


def pareto_points(rows: list[ProfileRow]) -> list[dict[str, object]]:
    """One point per artifact: size, perplexity (from its manifest, or None) and its best generation
    tokens/s (tg tests; pp when it has none)."""
    best: dict[str, dict[str, object]] = {}
    for r in rows:
        tps = r.tps[0]
        if tps is None or r.status == "error":
            continue
        kind = "tg" if r.n_gen and not r.n_prompt else "pp"
        name = str(r.artifact.get("name"))
        cur = best.get(name)
        better = cur is None or (kind == "tg" and cur["kind"] != "tg") or (kind == cur["kind"] and tps > cur["tps"])
        if better:
            best[name] = {"name": name, "size_bytes": r.artifact.get("size_bytes"), "tps": tps, "kind": kind,
                          "test": r.test, "perplexity": r.artifact.get("perplexity")}
    return list(best.values())


def pareto_png(rows: list[ProfileRow], path: str | Path) -> Path:
    """Size (x) vs tokens/s (y), colored by perplexity where the manifest has one; the Pareto front joined."""
    require("matplotlib", "tui")
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    pts = pareto_points(rows)
    path = Path(path)
    fig, ax = plt.subplots(figsize=(7, 4.5), dpi=120)
    sizes = [p["size_bytes"] / 1e6 for p in pts]  # type: ignore[operator]
    tps = [p["tps"] for p in pts]
    ppl = [p["perplexity"] for p in pts]
    if any(v is not None for v in ppl):
        known = [v for v in ppl if v is not None]
        sc = ax.scatter(sizes, tps, c=[v if v is not None else max(known) for v in ppl], cmap="viridis_r", s=60)
        fig.colorbar(sc, ax=ax, label="perplexity (manifest)")
    else:
        ax.scatter(sizes, tps, s=60)
    for p, x, y in zip(pts, sizes, tps, strict=True):
        label = str(p["name"]) + (f"\nppl {p['perplexity']:.2f}" if p["perplexity"] is not None else "")
        ax.annotate(label, (x, y), textcoords="offset points", xytext=(5, 5), fontsize=8)
    front = sorted(zip(sizes, tps, strict=True))
    line, top = [], -1.0
    for x, y in front:  # smaller and faster: a point is on the front when nothing smaller is faster
        if y > top:
            line.append((x, y))
            top = y
    if len(line) > 1:
        ax.plot(*zip(*line, strict=True), "--", color="grey", linewidth=1)
    kinds = {p["test"] for p in pts}
    ax.set_xlabel("size (MB)")
    ax.set_ylabel(f"tokens/s ({', '.join(sorted(map(str, kinds)))})")
    ax.set_title("size vs speed (vs perplexity)")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    with atomic_file(path) as tmp:
        fig.savefig(tmp, format="png")
    plt.close(fig)
    return path


def terminal_bars(rows: list[ProfileRow], width: int = 80) -> str:
    """Tokens/s per artifact and test as a horizontal bar chart string (plotext)."""
    import plotext as plt

    labels, values = [], []
    for r in rows:
        if r.tps[0] is not None:
            labels.append(f"{r.artifact.get('name')} {r.test} t{r.config.get('n_threads')} c{r.config.get('n_ctx')}")
            values.append(round(float(r.tps[0]), 2))
    plt.clear_figure()
    plt.bar(labels, values, orientation="horizontal", width=0.3)
    plt.title("tokens/s")
    plt.plotsize(width, max(6, 2 * len(labels) + 4))
    plt.theme("clear")
    return plt.build()
