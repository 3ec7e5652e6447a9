"""Rich renderings of SDK results for the terminal.

Cells are :class:`rich.text.Text`: a str cell is parsed as markup, and paths, model names and tensor
names are data that may hold brackets.
"""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table
from rich.text import Text


def mb(n: float) -> str:
    return f"{n / 1e6:.1f} MB"


def tensor_type_flags(recipe: Any) -> list[str]:
    """A manifest recipe's per-tensor overrides as the flags that made them (what is not a list of
    pattern/type pairs, in a hand-edited manifest, is left out)."""
    pairs = recipe.get("tensor_types") if isinstance(recipe, dict) else None
    return [f"--tensor-type {p[0]}={p[1]}" for p in pairs or () if isinstance(p, (list, tuple)) and len(p) == 2] \
        if isinstance(pairs, list) else []


def render_inspect(console: Console, info: dict[str, Any], show_tensors: bool = False) -> None:
    hp = info["hparams"]
    head = Table.grid(padding=(0, 2))
    head.add_column(style="bold")
    head.add_column()

    def row(label: str, value: str) -> None:
        head.add_row(label, Text(value))

    row("file", info["path"])
    row("architecture", f"{info['architecture']}  ({info.get('name') or ''})")
    ffn = hp["feed_forward_length"]
    if isinstance(ffn, list):  # per-block widths (llama.cpp's deci)
        ffn = f"{min(ffn)}-{max(ffn)} per block (mean {sum(ffn) / max(len(ffn), 1):.0f})"
    row("shape", f"{hp['block_count']} layers, hidden {hp['embedding_length']}, ffn {ffn}, "
                 f"{hp['attention.head_count']} heads / {hp['attention.head_count_kv']} KV heads, "
                 f"vocab {hp['vocab_size']}, trained ctx {hp['context_length']}")
    row("parameters", f"{info['n_params'] / 1e6:.1f} M")
    row("size", f"{mb(info['file_bytes'])} file, {mb(info['weight_bytes'])} weights, {info['bpw']:.3f} bits/weight")
    mem = info["memory"]
    kv, kv_type = (mem["kv_cache_f16"], "f16") if "kv_cache_f16" in mem else (mem["kv_cache"], mem["kv_type"])
    run = mem.get("to_run")
    rest = (f"; {mb(run['bytes'])} at peak to run on {run['runtime']} (with its compute buffers and the process's own memory)" if run
            else ", plus compute buffers")
    beyond = (f" (beyond the trained context of {mem['beyond_trained']}: the model may not keep its quality "
              "there)" if mem.get("beyond_trained") else "")
    row(f"memory @ ctx {mem['ctx']}", f"{mb(mem['total'])} = {mb(mem['weights'])} weights + "
                                      f"{mb(kv)} KV cache ({kv_type}){rest}{beyond}")
    if info.get("onnx"):
        o = info["onnx"]
        row("onnx", f"opset {o['opset']}, IR {o['ir_version']}; ops "
                    + ", ".join(f"{k} x{v}" for k, v in o["ops"].items()))
    if info.get("coreml"):
        c = info["coreml"]
        row("coreml", f"iOS18 program, context {c['context']}, {c['states']} states; ops "
                      + ", ".join(f"{k} x{v}" for k, v in c["ops"].items()))
    if info.get("recipe"):
        r = info["recipe"]
        row("recipe", f"method {r.get('method')}, preset {info.get('preset') or r.get('preset')}"
                       + (f" (--bits {r['bits']})" if r.get("bits") else "")
                       + "".join(f", {flag}" for flag in tensor_type_flags(r)))
    if info.get("pruned"):
        row("pruned", pruning_line(info["pruned"]))
    if info.get("sparsity"):
        sp = info["sparsity"]
        stored = sp.get("stored", sp["mean"])
        kept = "are zero" if round(1000 * stored) == round(1000 * sp["mean"]) else \
            (f"were pruned, {100 * stored:.1f}% are stored as exact zeros (a grid with a minimum stores a pruned "
             "weight as its nearest value, within half a step of 0)")
        row("sparsity", f"{100 * sp['mean']:.1f}% of the weights of {sp['linears']} linears {kept} "
                        f"({', '.join(sp['steps'])}); no CPU runtime skips zeros, so no speed-up")
    if info.get("ternary"):
        row("ternary", ternary_line(info["ternary"]))
    if info.get("sparse_ffn"):
        row("sparse FFN", sparse_ffn_line(info["sparse_ffn"]))
    if info.get("distill"):
        d = info["distill"]
        row("fine-tuned", f"distilled from the float model {d['steps']} steps in {d['minutes']} min, {trained_kl(d)}")
    if info["fallbacks"]:
        summary = ", ".join(f"{k} x{v}" for k, v in info["fallback_summary"].items())
        n = info["fallbacks"]
        row("fallbacks", f"{n} tensor{'s' if n != 1 else ''} ({summary}): row width not a multiple of the "
                         "K-quant super-block (256), same rule as llama.cpp")
    for e in info.get("eval", [])[-3:]:
        if "fid" in e:  # a diffusion model's images
            from edgekit.evaluate import diffusion_label

            row("eval", diffusion_label(e))
            continue
        extra = f", KL {e['kl_mean']:.4f}, top-1 {100 * e['top1_agreement']:.1f}%" if "kl_mean" in e else ""
        row("eval", f"ppl {e['ppl']:.3f} (ctx {e['ctx']}, {e['chunks']} chunks){extra}")
    console.print(head)
    if info.get("gguf"):
        _gguf_options(console, info["gguf"], info["memory"]["ctx"])
    elif info.get("gguf_error"):
        console.print(Text(f"convert --to gguf: {info['gguf_error']}", style="yellow"))
    types = Table(title="tensor types")
    for col in ("type", "tensors", "size"):
        types.add_column(col, justify="right" if col != "type" else "left")
    for t, n in info["type_counts"].items():
        types.add_row(Text(t), str(n), mb(info["type_bytes"][t]))
    console.print(types)
    if show_tensors:
        tt = Table(title="tensors")
        for col in ("name", "type", "shape", "size", "note"):
            tt.add_column(col)
        for t in info["tensors"]:
            note = f"wanted {t['wanted']}" if "wanted" in t else ""
            tt.add_row(Text(t["name"]), Text(t["type"]), "x".join(map(str, t["shape"])), mb(t["bytes"]), note)
        console.print(tt)


def sparse_ffn_line(sp: dict[str, Any]) -> str:
    """The hot/cold split of a ``convert --sparse-ffn`` file and what it costs the FFN's output."""
    line = (f"{sp['hot']} hot neurons + {sp['clusters']} clusters of {sp['cluster_size']}, {sp['used']} run per "
            f"token ({100 * sp['sparsity']:.0f}% of each FFN skipped); the router finds "
            f"{100 * sp['recall_mean']:.0f}% of each token's best clusters")
    if e := sp.get("ffn_output_error"):
        line += (f"; FFN output off by {100 * e['router']:.0f}% (perfect router {100 * e['perfect_router']:.0f}%, "
                 f"as many single neurons {100 * e['top_k']:.0f}%)")
    return line


def _gguf_options(console: Console, rows: list[dict[str, Any]], ctx: int) -> None:
    """What each 'convert --bits N' makes of a checkpoint: the converter's own type plan, before converting."""
    table = Table(title=f"edgekit convert MODEL --bits N: each GGUF mix's tensor data, memory at ctx {ctx}")
    for col in ("--bits", "mix", "MB", "bpw", "memory", "fallbacks"):
        table.add_column(col, justify="left" if col in ("mix", "fallbacks") else "right", no_wrap=col != "fallbacks")
    for r in rows:
        fell = ", ".join(f"{k} x{v}" for k, v in r["fallback_summary"].items()) or "-"
        table.add_row("-" if r["bits"] is None else str(r["bits"]), r["preset"], f"{r['weight_bytes'] / 1e6:.1f}",
                      f"{r['bpw']:.2f}", mb(r["memory_total"]), fell)
    console.print(table)
    if any(r["fallbacks"] for r in rows):
        console.print(Text("fallbacks: rows whose width is not a multiple of a type's block (256 for K-quants) "
                           "take a 32-wide type, as llama.cpp does; 'convert --bpw' or '--size' picks types per "
                           "tensor to a budget instead", style="dim"))


def pruning_line(p: dict) -> str:
    """One line on what structural pruning removed (and how healing went)."""
    if p.get("kind") == "depth":
        why = "as named" if p.get("measure") == "given" else f"by {p.get('measure', '?')}"
        line = f"depth: blocks {', '.join(map(str, p['dropped_layers']))} of {p['n_layer_source']} removed ({why})"
    elif p.get("ffn_widths"):
        w = p["ffn_widths"]
        line = (f"width:auto: FFN {p['n_ff_source']} -> {min(w)}-{max(w)} per block (mean {sum(w) / len(w):.0f}), "
                f"query heads {p['n_head_source']} -> {p['n_head']}")
        if all(k in p for k in ("n_params_source", "n_params", "params_target")):
            line += (f"; {p['n_params_source'] / 1e6:.1f}M -> {p['n_params'] / 1e6:.1f}M parameters (budget "
                     f"{p['params_target'] / 1e6:.1f}M)")
        line += " (widths by measured KL, neurons by activation importance)"
    else:
        line = (f"width: FFN {p['n_ff_source']} -> {p['n_ff']}, query heads {p['n_head_source']} -> {p['n_head']} "
                "per block (by activation importance)")
    h = p.get("heal")
    if h:
        refit = (f" (least-squares refit of the narrowed projections: {h['kl_refit']:.4f}"
                 f"{'' if h.get('refit_kept', True) else ', not kept'})") if "kl_refit" in h else ""
        line += f"; healed {h['steps']} steps in {h['minutes']} min, {trained_kl(h)}" + refit
    return line


def training_notes(m: dict) -> list[str]:
    """What a manifest says was done beyond rounding (weight pruning, a distillation), for ``show``'s recipe
    line: two artifacts made with and without it must not read alike. Defensive: a hand-edited manifest."""
    notes = []
    sp = m.get("sparsity")
    if isinstance(sp, dict) and isinstance(sp.get("steps"), list) and isinstance(sp.get("mean"), (int, float)):
        stored = sp.get("stored", sp["mean"])
        kept = "zeros" if round(100 * stored) == round(100 * sp["mean"]) else \
            f"pruned, {100 * stored:.0f}% stored as exact zeros: the grid's minimum keeps the rest near 0"
        notes.append(f"pruned {'+'.join(map(str, sp['steps']))} ({100 * sp['mean']:.0f}% {kept})")
    for key in ("ternary", "aqlm"):
        d = m.get(key, {}).get("distill") if isinstance(m.get(key), dict) else None
        if isinstance(d, dict) and {"steps", "kl_before", "kl_after"} <= d.keys():
            with contextlib.suppress(TypeError, ValueError, KeyError):
                notes.append(f"distilled {int(d['steps'])} steps ({trained_kl(d)})")
    return notes


def trained_kl(h: dict) -> str:
    """Held-out KL before and after a heal or distillation; one that ended worse was not kept."""
    if h.get("kept") is False:
        if "kl_trained" in h:
            return f"KL {h['kl_before']:.4f} -> {h['kl_trained']:.4f}, worse: not kept"
        return f"KL {h['kl_before']:.4f} -> {h['kl_after']:.4f}, worse"
    return f"KL {h['kl_before']:.4f} -> {h['kl_after']:.4f}"


def ternary_line(t: dict) -> str:
    """One line on the ternary share of a model (and how its distillation went)."""
    stored = ", ".join(f"{k} x{v}" for k, v in t["stored_as"].items())
    line = (f"{100 * t['share']:.1f}% of the parameters ({t['linears']} linears) are -1/0/+1 x an fp16 scale per "
            f"{t['group']} weights, 256 in TQ types ({t['scale']} scale); stored as {stored}")
    d = t.get("distill")
    if d:
        line += f"; distilled {d['steps']} steps in {d['minutes']} min, {trained_kl(d)}"
    return line


def eval_table(artifact: Path, res: Any) -> Table:
    """``eval``'s result as a table: its figures are never cut short (no wrap, and as wide as they are)."""
    fmt = lambda v, f: "-" if v is None else format(v, f)  # noqa: E731
    cells = [f"{res.ppl:.4f}", f"{res.ppl_stderr:.4f}", fmt(res.ref_ppl, ".4f"), fmt(res.kl_mean, ".5f"),
             fmt(res.kl_p99, ".4f"), fmt(None if res.top1_agreement is None else 100 * res.top1_agreement, ".2f")]
    table = Table(title=Text(f"{artifact} on {res.provenance()} ({res.tokens_scored} tokens scored)"))
    for col, cell in zip(("perplexity", "±", "ref perplexity", "KL mean", "KL p99", "top-1"), cells, strict=True):
        table.add_column(col, justify="right", no_wrap=True, min_width=len(cell))
    table.add_row(*cells)
    return table
