"""Speculative decoding on SmolLM2-135M-Instruct: edgekit's drafts of the model itself and prompt lookup,
against plain decoding, in one run on one machine.

    python bench/speculative.py [--targets F16,Q8_0] [--drafts DIR,...] [--max-tokens 128] [--threads 2]
                                [--ngram-only] [--rounds N]

Targets: edgekit's F16 and Q8_0 GGUFs of the float checkpoint (``--targets`` takes any preset, e.g.
Q4_K_M, and ``onnx:BITS`` for edgekit's ONNX graph at 16, 32 or 4 bits, run by onnxruntime). Drafts of a GGUF
target (GGUF, same tokenizer), by default:

* ``draft-for``: ``edgekit convert MODEL --draft-for MODEL`` (the draft recipe: depth-pruned to a third of
  the blocks by block influence, distilled from the model, Q4_0), built once and cached;
* ``depth:20 Q4_0``: the same pruning without distillation;
* ``Q4_0``: a low-bit copy at full depth (agrees often, but costs about as much as the target here).

An ONNX target (which drafts with an ONNX model) is drafted by ``draft-for (8-bit ONNX)``, ``edgekit convert
MODEL --to onnx --draft-for MODEL`` (the whole model at 8 bits), and by ``onnx:4``, the 4-bit ONNX copy;
``--drafts`` entries go to the targets of their own format.

Prompts: 10 open chat questions and 10 input-grounded tasks (rewrite, extract, correct) over paragraphs of
WikiText-2 valid (read from ../shared). Each is generated greedily for ``--max-tokens`` tokens with each
drafter and without (``--rounds N``: every mode N times, interleaved, speeds averaged); decode speed is
the worker's own (generated - 1) / (time after the first token), so no IPC is in it; every mode of every
round runs in a child process of its own, which loads the model once, as `serve` and `chat` do. Lossless: greedy
output token-identical to plain decoding, prompt by prompt; where they differ the row keeps the target's
top-2 logit gap at the first difference (llama.cpp's CPU kernels round differently by batch width for
some types, and past 256 cached tokens for all: see the README's speculative paragraph).

For prompt lookup the run also prints a bound: the speed-up an oracle lookup drafter would give on the
plain outputs at the measured costs (it drafts from whichever earlier occurrence agrees longest with what
the target will say, exactly as far as it will be accepted), so a target above the bound is out of reach
for any prompt-lookup drafter on this model and machine. ``--ngram-only`` skips the model drafts.

GGUF targets also run the peer, llama-cpp-python's own prompt-lookup drafting (``LlamaPromptLookupDecoding``,
10 tokens a draft, its default), against the same ``Llama`` without a draft model (``--no-peer`` skips it).

For each model draft it prints the acceptance rate a draft of that measured cost would need for 1.5x plain
decode (each drafted token right with that probability, independently, at the best draft length), or
"unreachable" when even an always-right draft of that cost falls short.

The ``noisy`` column flags a row measured while the 1-minute load average was above the core count (other
programs took CPU time from it) or whose rounds' speeds are more than 5% apart (``common.noise_flag``); a
line under the table counts them.

Writes ``bench/results/speculative.json`` and ``.txt``; ``--render`` measures nothing and prints and rewrites
them from the stored JSON (after a change to the derived columns).
"""

from __future__ import annotations

import argparse
import datetime as dt
import functools
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path
from typing import Any

# OpenMP threads spin between ops, as with OpenMP's defaults in a user's shell (gguf_rtn sets a passive wait
# for shared CI cores, which adds a wake-up to every op of a one-token step: about 3x its time here)
os.environ.setdefault("OMP_WAIT_POLICY", "ACTIVE")

from common import NOISY_SPREAD, noise_flag  # noqa: E402
from gguf_rtn import cpu_model, get_model, log, pkg_version  # noqa: E402
from rich.console import Console  # noqa: E402
from rich.table import Table  # noqa: E402
from speculative_bounds import (  # noqa: E402
    acceptance_needed,
    best_possible,
    lookup_bounds,
    mean_bound,
)

from edgekit import api  # noqa: E402
from edgekit.artifact import Artifact  # noqa: E402
from edgekit.converters.formats.base import ConvertRecipe  # noqa: E402
from edgekit.evaluate import read_text  # noqa: E402
from edgekit.fsutil import edgekit_home  # noqa: E402
from edgekit.runtime.base import GenerationStats, SamplingConfig  # noqa: E402
from edgekit.runtime.llamacpp import LlamaCppBackend  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
PEER_PLAIN, PEER_LOOKUP = "llama-cpp-python plain", "llama-cpp-python prompt lookup"
DEFAULT_TEXT = Path(__file__).resolve().parents[2] / "shared/data/wikitext-2/valid.txt"
HOME = edgekit_home() / "bench-spec"

CHAT = [
    "What are the benefits of regular exercise?",
    "Explain how photosynthesis works.",
    "Write a short story about a robot who learns to paint.",
    "What is the difference between a virus and a bacterium?",
    "Give me three tips for learning a new language.",
    "Why is the sky blue?",
    "Describe the water cycle.",
    "What should I pack for a weekend camping trip?",
    "How does a computer store information?",
    "Write a poem about the sea.",
]
TASKS = [
    "Rewrite the following text in simpler words:\n\n{p}",
    "Copy the following text, correcting any spelling mistakes:\n\n{p}",
    "Extract every name, place and date from this text:\n\n{p}",
    "Summarize the following text, quoting its key sentences:\n\n{p}",
    "Repeat the following paragraph exactly:\n\n{p}",
]


def grounded_prompts(text: Path, n: int = 10) -> list[str]:
    paras = [p.strip() for p in read_text(text).split("\n") if 300 < len(p.strip()) < 700 and not p.strip().startswith("=")]
    return [TASKS[i % len(TASKS)].format(p=paras[i * 7]) for i in range(n)]


def build(hf: Path, name: str, recipe: ConvertRecipe, fmt: str = "gguf") -> Path:
    out = HOME / name
    if not (out / "edgekit.json").exists():
        log(f"converting {name}")
        t0 = time.perf_counter()
        api.convert(hf, fmt, output=out, recipe=recipe, force=True)
        log(f"  {name}: {time.perf_counter() - t0:.0f} s")
    return out


def build_target(hf: Path, spec: str) -> Path:
    """A ``--targets`` item: a GGUF preset (``Q8_0``) or ``onnx:BITS``."""
    if spec.lower().startswith("onnx:"):
        bits = int(spec.split(":", 1)[1])
        return build(hf, f"onnx-{bits}", ConvertRecipe(bits=bits), fmt="onnx")
    return build(hf, spec.lower(), ConvertRecipe(preset=spec))


@functools.cache
def is_onnx(path: Path) -> bool:
    """Whether an artifact folder holds an ONNX graph (read once per folder: the loops below ask often)."""
    return Artifact.open(path).format == "onnx"


def run_prompts(target: Path, prompts: list[str], max_tokens: int, threads: int,
                **opts: Any) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    greedy = SamplingConfig(temperature=0, max_tokens=max_tokens)
    out = []
    with api.open_backend(target, n_ctx=2048, n_threads=threads, **opts) as b:
        info = dict(b.info.get("speculative") or {})
        "".join(b.generate([{"role": "user", "content": "Hi"}], SamplingConfig(temperature=0, max_tokens=8)))  # warm
        for p in prompts:
            st = GenerationStats()
            text = "".join(b.generate([{"role": "user", "content": p}], greedy, st))
            # llama.cpp: the worker's own clock (no pipe traffic in it); onnxruntime runs in this process
            decode = (st.extra.get("worker_total_time", st.total_time)
                      - st.extra.get("worker_time_to_first_token", st.time_to_first_token))
            spec = st.extra.get("speculative") or {}
            out.append({"text": text, "tokens": st.generated_tokens, "decode_s": decode,
                        "tok_s": (st.generated_tokens - 1) / decode if decode > 0 else 0.0,
                        "drafted": spec.get("drafted", 0), "accepted": spec.get("accepted", 0)})
    return out, info


def in_child(fn: Any, *args: Any, **kwargs: Any) -> Any:
    """``fn(*args, **kwargs)`` in a spawned child process of its own (see :func:`run_isolated`, :func:`run_peer`)."""
    import multiprocessing

    with multiprocessing.get_context("spawn").Pool(1) as pool:
        return pool.apply(fn, args, kwargs)


def run_isolated(target: Path, prompts: list[str], max_tokens: int, threads: int,
                 **opts: Any) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """:func:`run_prompts` in a child process of its own, as ``serve`` or ``chat`` loads a model once in a
    process. In one process for every mode, the later modes ran slower than the same loads in fresh
    processes (onnxruntime sessions made and dropped one after another: on rewrite/extract prompts prompt
    lookup 1.78-1.95x and the 8-bit draft 1.08-1.30x there, against 2.12x and 1.41x for `edgekit run` in a
    process per prompt), so each mode now starts clean."""
    return in_child(run_prompts, target, prompts, max_tokens, threads, **opts)


def run_peer(target: Path, prompts: list[str], max_tokens: int, threads: int,
             lookup: bool) -> list[dict[str, Any]]:
    """:func:`peer_answers` in a child process: llama.cpp's OpenMP threads spin-wait in the process that
    used them (OMP_WAIT_POLICY=ACTIVE, as in a user's shell), and would slow every later edgekit row."""
    return in_child(peer_answers, target, prompts, max_tokens, threads, lookup)


def peer_answers(target: Path, prompts: list[str], max_tokens: int, threads: int,
                 lookup: bool) -> list[dict[str, Any]]:
    """llama-cpp-python as its users run it: ``create_chat_completion``, streamed, greedy; ``lookup``: with its
    own prompt-lookup drafting (``LlamaPromptLookupDecoding``, ``num_pred_tokens`` 10, its default), the
    peer of edgekit's ``--speculative ngram``. Decode speed from the stream: (tokens - 1) / (time from the
    first piece to the last), tokens counted by tokenizing the answer."""
    import llama_cpp
    from llama_cpp.llama_speculative import LlamaPromptLookupDecoding

    draft = LlamaPromptLookupDecoding(num_pred_tokens=10) if lookup else None
    llm = llama_cpp.Llama(model_path=str(Artifact.open(target).model_file), n_ctx=2048, n_threads=threads,
                          n_threads_batch=threads, draft_model=draft, verbose=False)
    out = []
    try:
        for prompt in prompts:
            llm.reset()
            first = last = None
            parts = []
            for chunk in llm.create_chat_completion([{"role": "user", "content": prompt}], temperature=0.0, top_k=1,
                                                    max_tokens=max_tokens, stream=True):
                piece = chunk["choices"][0]["delta"].get("content")
                if piece:
                    last = time.perf_counter()
                    first = first or last
                    parts.append(piece)
            text = "".join(parts)
            n = len(llm.tokenize(text.encode("utf-8"), add_bos=False, special=False))
            decode = (last - first) if first and last else 0.0
            out.append({"text": text, "tokens": n, "decode_s": decode,
                        "tok_s": (n - 1) / decode if decode > 0 else 0.0})
    finally:
        llm.close()
    return out


def _backend(target: Path, threads: int) -> Any:
    if is_onnx(target):
        return api.open_backend(target, n_ctx=2048, n_threads=threads)
    return LlamaCppBackend(Artifact.open(target).model_file, n_ctx=2048, n_threads=threads)


def tokenized(target: Path, prompts: list[str], outputs: list[str], threads: int) -> list[tuple[list[int], list[int]]]:
    """(chat-templated prompt ids, output ids) as the target's tokenizer reads them."""
    with _backend(target, threads) as be:
        return [(be.tokenize(f"<|im_start|>user\n{p}<|im_end|>\n<|im_start|>assistant\n", add_special=False),
                 be.tokenize(o, add_special=False)) for p, o in zip(prompts, outputs, strict=True)]


def first_difference(target: Path, prompt: str, a: str, b: str, threads: int) -> dict[str, Any]:
    """Where two greedy outputs part: the target's top-2 logit gap there."""
    import numpy as np

    with _backend(target, threads) as be:
        ta, tb = be.tokenize(a, add_special=False), be.tokenize(b, add_special=False)
        i = next((j for j in range(min(len(ta), len(tb))) if ta[j] != tb[j]), min(len(ta), len(tb)))
        head = be.tokenize(f"<|im_start|>user\n{prompt}<|im_end|>\n<|im_start|>assistant\n", add_special=False)
        z = be.logits(head + ta[:i])[-1]
    top = np.sort(z)[-2:]
    return {"token": i, "top2_gap": float(top[1] - top[0])}


def ratio(x: float, threshold: float) -> str:
    """``x`` as ``1.23x``, with more digits where two would round it onto the threshold it is checked against
    (1.9989 against 2: ``1.9989x``, not a ``2.00x`` that then reads MISSED)."""
    return f"{x:.4f}x" if f"{x:.2f}" == f"{threshold:.2f}" and x != threshold else f"{x:.2f}x"


def render(report: dict[str, Any], out: Path) -> None:
    """Print the table and the target checks of ``report`` (its measured rows) and write ``out``.json/.txt."""
    rows = report["rows"]
    n_prompts = report.get("prompts_per_kind", 10)
    targets = list(dict.fromkeys(r["target"] for r in rows))
    drafts = any(r["drafter"].startswith("draft") for r in rows)
    checks: list[str] = []
    console = Console(record=True, width=175)
    table = Table(title=f"Speculative decoding, SmolLM2-135M-Instruct, greedy, {report['max_tokens']} tokens, "
                        f"{report['threads']} threads, llama.cpp via llama-cpp-python {report['llama_cpp_python']}"
                        + (f", onnxruntime {report['onnxruntime']}" if report.get("onnxruntime") else ""))
    cores = report.get("cores")  # absent from reports written before the noise column
    for col in ("target", "prompts", "drafter", "tok/s", "speedup", "accepted", "identical", "step/extra/draft ms",
                "perfect draft", "needs for 1.5x", "noisy"):
        table.add_column(col, justify="left" if col in ("target", "prompts", "drafter") else "right")
    for r in rows:
        c = r.get("costs")
        perfect = best_possible(c) if c else None
        need = acceptance_needed(c, 1.5) if c and r["drafter"].startswith("draft") else None
        r["acceptance_for_1_5x"] = need
        r["noisy"] = noise_flag(r.get("round_tok_s", []), r.get("loadavg", []), cores) if cores else None
        table.add_row(r["target"], r["prompts"], r["drafter"], f"{r['tok_s']:.1f}", f"{r['speedup']:.2f}x",
                      "-" if r["acceptance"] is None else f"{100 * r['acceptance']:.0f}%",
                      f"{r['identical']}/{n_prompts}",
                      f"{c['step_ms']:.1f}/{c['extra_ms']:.1f}/{c['draft_ms']:.1f}" if c else "-",
                      f"{perfect[0]:.2f}x (k={perfect[1]})" if perfect else "-",
                      "-" if not (c and r["drafter"].startswith("draft")) else
                      "unreachable" if need is None else f"{100 * need:.0f}% accepted",
                      "?" if r["noisy"] is None else r["noisy"] or "-")
    console.print(table)
    console.print("step: one-token target step; extra: each further token verified in the same batch; draft: one "
                  "draft step (measured when the drafter loads). perfect draft: the speedup a draft that is always "
                  "right would give at those costs. needs for 1.5x: the acceptance rate (per drafted token, independent) at "
                  "which a draft of that measured cost would reach 1.5x plain decode at the best draft length.")
    for line in noise_lines(report):
        console.print(line, soft_wrap=True, highlight=False)

    def row(t: str, k: str, d: str) -> dict[str, Any]:
        return next(r for r in rows if r["target"] == t and r["prompts"] == k and r["drafter"] == d)

    for t in targets:
        for k in ("chat", "grounded") if drafts else ():
            mine = [r for r in rows if r["target"] == t and r["prompts"] == k and r["drafter"].startswith("draft")]
            if not mine:
                continue
            best = max(mine, key=lambda r: r["speedup"])
            ok = best["speedup"] >= 1.5
            need = best.get("acceptance_for_1_5x")
            why = "" if ok or not best.get("costs") else (
                "; at its measured cost no acceptance rate reaches 1.5x" if need is None else
                f"; at its measured cost it would need {100 * need:.0f}% of drafted tokens accepted")
            checks.append(f"{t} {k}: best edgekit draft ({best['drafter']}) {ratio(best['speedup'], 1.5)} plain decode "
                          f"(target >= 1.5x): {'HOLDS' if ok else 'MISSED'}{why}")
        g, c = row(t, "grounded", "ngram"), row(t, "chat", "ngram")
        bound = (f"; the best any prompt-lookup drafter could do on these outputs at these costs: "
                 f"{g['lookup_bound']:.2f}x") if g.get("lookup_bound") else ""
        checks.append(f"{t} grounded: ngram {ratio(g['speedup'], 2)} (target >= 2x): "
                      f"{'HOLDS' if g['speedup'] >= 2 else 'MISSED'}{bound}")
        checks.append(f"{t} chat: ngram {ratio(c['speedup'], 0.95)} (target: at most 5% slower): "
                      f"{'HOLDS' if c['speedup'] >= 0.95 else 'MISSED'}")
        for k in ("grounded", "chat"):
            peer = [r for r in rows if r["target"] == t and r["prompts"] == k and r["drafter"] == PEER_LOOKUP]
            if peer:
                mine = row(t, k, "ngram")
                checks.append(f"{t} {k}: the peer, {PEER_LOOKUP}, {peer[0]['speedup']:.2f}x its own plain decoding "
                              f"({peer[0]['tok_s']:.1f} tok/s); edgekit's ngram {mine['speedup']:.2f}x "
                              f"({mine['tok_s']:.1f} tok/s, {mine['tok_s'] / peer[0]['tok_s']:.2f}x the peer's speed)")
    spec_rows = [r for r in rows if not r["drafter"].startswith(("none", "llama-cpp-python"))]
    total = sum(r["identical"] for r in spec_rows)
    n = n_prompts * len(spec_rows)
    checks.append(f"lossless: {total}/{n} greedy outputs token-identical to plain decoding")
    for c in checks:  # one line each, however long: a wrapped tail reads like a line of its own
        console.print(c, soft_wrap=True, highlight=False)
    report["checks"] = checks
    write_report(report, console, out)


def noise_lines(report: dict[str, Any]) -> list[str]:
    """What the table's noisy column adds up to: how many rows ran on a busy machine or had rounds that
    disagree, and what then to do (after :func:`render` has flagged each row)."""
    rows, cores = report["rows"], report.get("cores")
    if not cores:
        return ["noisy: ? (this report predates the load and round checks)"]
    noisy = [r for r in rows if r.get("noisy")]
    start, end = report.get("loadavg_start"), report.get("loadavg_end")
    load = f"load average {start:.1f} at start, {end:.1f} at end on {cores} cores" if start is not None else ""
    out = []
    if noisy:
        out.append(f"noisy: {len(noisy)} of {len(rows)} rows (noisy column) ran with the load average above the "
                   f"{cores} cores or had rounds more than {100 * NOISY_SPREAD:.0f}% apart; their speeds and speed-ups "
                   f"are uncertain: rerun them on an idle machine ({load})")
    else:
        out.append(f"noisy: no row (load average at most the {cores} cores while each ran"
                   + (f", rounds within {100 * NOISY_SPREAD:.0f}%" if report.get("rounds", 1) > 1 else "") + f"; {load})")
    if report.get("rounds", 1) < 2:
        out.append("one round: no repeated measurement to compare (--rounds 3 also flags rows whose rounds disagree)")
    return out


def write_report(report: dict[str, Any], console: Console, out: Path) -> None:
    """``out``.json (the report) and ``out``.txt (what ``console`` printed)."""
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(report, indent=1, default=str))
    out.with_suffix(".txt").write_text(console.export_text())


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--text", type=Path, default=DEFAULT_TEXT)
    ap.add_argument("--targets", default="F16,Q8_0")
    ap.add_argument("--drafts", default="", help="extra draft artifact folders (name=path,...)")
    ap.add_argument("--draft-heal", default="15m", help="distillation time of the draft-for recipe")
    ap.add_argument("--max-tokens", type=int, default=128)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=1,
                    help="run every mode this many times, interleaved, and average the speeds")
    ap.add_argument("--ngram-only", action="store_true", help="prompt lookup only: build and time no draft model")
    ap.add_argument("--no-gguf-drafts", action="store_true",
                    help="build and time no GGUF draft model (GGUF targets get prompt lookup; ONNX targets keep theirs)")
    ap.add_argument("--no-peer", action="store_true",
                    help="skip llama-cpp-python's own prompt-lookup drafting (run on GGUF targets by default)")
    ap.add_argument("--prompts", type=int, default=10,
                    help="prompts of each kind (chat, rewrite/extract), at most 10 (fewer: a quicker, noisier run)")
    ap.add_argument("--out", type=Path, default=RESULTS / "speculative")
    ap.add_argument("--render", action="store_true",
                    help="measure nothing: print the table and checks of the stored OUT.json again (e.g. after a "
                         "change to the derived columns) and rewrite OUT.json/.txt")
    args = ap.parse_args(argv)
    if args.render:
        stored = args.out.with_suffix(".json")
        if not stored.exists():
            ap.error(f"no {stored}: run the benchmark first")
        render(json.loads(stored.read_text()), args.out)
        return 0

    hf = get_model()
    targets = {t: build_target(hf, t) for t in args.targets.split(",")}
    drafts: dict[str, Path] = {}
    draft_build_s = None
    if not (args.ngram_only or args.no_gguf_drafts) and not all(is_onnx(t) for t in targets.values()):
        log("building the draft-for draft (cached)")
        t0 = time.perf_counter()
        from edgekit.converters.draft import draft_recipe

        drafts["draft-for"] = build(hf, f"draft-for-{args.draft_heal}", draft_recipe(hf, heal=args.draft_heal))
        draft_build_s = time.perf_counter() - t0
        spec = draft_recipe(hf, heal=args.draft_heal).prune
        drafts[f"{spec} Q4_0 (undistilled)"] = build(hf, f"{spec.replace(':', '')}-q4_0",
                                                    ConvertRecipe(preset="Q4_0", prune=spec))
        drafts["Q4_0 full depth"] = build(hf, "q4_0", ConvertRecipe(preset="Q4_0"))
    for item in filter(None, args.drafts.split(",")):
        name, _, path = item.partition("=")
        drafts[name] = Path(path)
    if not args.ngram_only and any(is_onnx(t) for t in targets.values()):
        from edgekit.converters.draft import onnx_draft_recipe

        drafts["draft-for (8-bit ONNX)"] = build(hf, "onnx-draft-for", onnx_draft_recipe(hf), fmt="onnx")
        drafts["onnx:4 (4-bit ONNX copy)"] = build_target(hf, "onnx:4")

    n_kind = max(1, min(args.prompts, len(CHAT), 10))
    chat, grounded = CHAT[:n_kind], grounded_prompts(args.text)[:n_kind]
    rows: list[dict[str, Any]] = []
    loadavg_start = os.getloadavg()[0]
    plain_name, nofa_name = "none (plain)", "none (plain, no flash attention)"
    for tname, target in targets.items():
        for kind, prompts in (("chat", chat), ("grounded", grounded)):
            onnx = is_onnx(target)  # onnxruntime has no flash-attention switch: one plain row
            modes: list[tuple[str, dict[str, Any]]] = [(plain_name, {})] if onnx else [
                (nofa_name, {}), (plain_name, {"flash_attn": True})]
            modes.append(("ngram", {"speculative": "ngram"}))
            if not (onnx or args.no_peer):  # the peer: llama-cpp-python's own prompt lookup, against its own plain
                modes += [(PEER_PLAIN, {}), (PEER_LOOKUP, {})]
            modes += [(f"draft: {n}", {"draft": str(p)}) for n, p in drafts.items()
                      if is_onnx(p) == onnx and p != target]
            runs: dict[str, list[tuple[list[dict[str, Any]], dict[str, Any]]]] = {n: [] for n, _ in modes}
            loads: dict[str, list[float]] = {n: [] for n, _ in modes}  # 1-minute load average after each run
            for rnd in range(args.rounds):  # every mode once per round: slow spells of a shared machine hit all alike
                for name, opts in modes:
                    log(f"{tname} {kind}: {name}" + (f" (round {rnd + 1}/{args.rounds})" if args.rounds > 1 else ""))
                    if name in (PEER_PLAIN, PEER_LOOKUP):
                        runs[name].append((run_peer(target, prompts, args.max_tokens, args.threads,
                                                    lookup=name == PEER_LOOKUP), {}))
                    else:
                        runs[name].append(run_isolated(target, prompts, args.max_tokens, args.threads, **opts))
                    loads[name].append(os.getloadavg()[0])
            speed = {n: statistics.mean(r["tok_s"] for res, _ in rs for r in res) for n, rs in runs.items()}
            for name, _ in modes:
                peer = name in (PEER_PLAIN, PEER_LOOKUP)
                base = speed[PEER_PLAIN if peer else plain_name]
                plain = runs[PEER_PLAIN if peer else plain_name][0][0]
                res, info = runs[name][0]  # texts, costs and differences from the first round
                drafted = sum(r.get("drafted", 0) for rs, _ in runs[name] for r in rs)
                accepted = sum(r.get("accepted", 0) for rs, _ in runs[name] for r in rs)
                same = [a["text"] == b["text"] for a, b in zip(plain, res, strict=True)]
                row = {"target": tname, "prompts": kind, "drafter": name, "tok_s": speed[name],
                       "speedup": speed[name] / base, "acceptance": accepted / drafted if drafted else None,
                       "identical": sum(same), "loadavg": loads[name],
                       "round_tok_s": [statistics.mean(r["tok_s"] for r in res) for res, _ in runs[name]]}
                if name.startswith(("ngram", "draft")) and not peer:
                    row["diffs"] = [first_difference(target, p, a["text"], b["text"], args.threads)
                                    for p, a, b, s in zip(prompts, plain, res, same, strict=True) if not s]
                    row["costs"] = info.get("costs")
                if name == "ngram" and info.get("costs"):
                    pairs = tokenized(target, prompts, [r["text"] for r in plain], args.threads)
                    row["lookup_bounds"] = lookup_bounds(pairs, info["costs"])
                    row["lookup_bound"] = mean_bound(row["lookup_bounds"])
                rows.append(row)

    report = {"date": dt.datetime.now().isoformat(timespec="seconds"), "cpu": cpu_model(), "machine": platform.machine(),
              "llama_cpp_python": pkg_version("llama_cpp_python"), "max_tokens": args.max_tokens,
              "onnxruntime": pkg_version("onnxruntime") if any(is_onnx(t) for t in targets.values()) else None,
              "threads": args.threads, "rounds": args.rounds, "draft_build_s": draft_build_s, "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY"),
              "drafts": {k: str(v) for k, v in drafts.items()}, "prompts_per_kind": len(chat), "rows": rows,
              "cores": os.cpu_count(), "loadavg_start": loadavg_start, "loadavg_end": os.getloadavg()[0]}
    render(report, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
