"""Predicted outputs on SmolLM2-135M-Instruct: an edit request that carries the text it edits as its
predicted output (OpenAI's ``prediction``; ``edgekit run --prediction FILE``), against plain decoding,
prompt lookup, and llama-cpp-python's own prompt-lookup drafting, in one run on one machine.

    python bench/predicted_outputs.py [--targets F16,Q8_0,onnx:16] [--max-tokens 160] [--rounds 2]

Prompts: 10 edit requests over 5 clean paragraphs of WikiText-2 valid (read from ../shared; the
WikiText tokenization undone, paragraphs with ``<unk>`` skipped): "repeat exactly" and "correct the
spelling" of a copy with a few letters swapped. Each request's prediction is the text it edits, as an
editor would send it. Modes per target:

* ``plain``: no drafting (GGUF with flash attention, as edgekit loads it whenever it drafts);
* ``ngram``: prompt lookup (the text is in the prompt too, so this is drafting without the prediction);
* ``prediction``: the request's predicted output (the text it edits);
* ``prediction = answer``: the plain answer itself as the prediction, an upper bound for any prediction;
* GGUF targets also run the peer, llama-cpp-python's ``LlamaPromptLookupDecoding`` (``num_pred_tokens``
  10, its default), against the same ``Llama`` without a draft model, in a child process, streamed.

Decode speed is (generated - 1) / (time after the first token): edgekit's from the llama.cpp worker's own
clock or onnxruntime's loop, the peer's from its stream. Every drafted answer is compared with plain
decoding's, token for token. Writes ``bench/results/predicted_outputs.json`` and ``.txt``.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime as dt
import os
import platform
import random
import re
import statistics
import sys
from pathlib import Path
from typing import Any

os.environ.setdefault("OMP_WAIT_POLICY", "ACTIVE")  # as bench/speculative.py: a user's shell default

from gguf_rtn import cpu_model, get_model, log, pkg_version  # noqa: E402
from rich.console import Console  # noqa: E402
from rich.table import Table  # noqa: E402
from speculative import DEFAULT_TEXT, RESULTS, build_target, is_onnx, run_peer, write_report  # noqa: E402

from edgekit import api  # noqa: E402
from edgekit.evaluate import read_text  # noqa: E402
from edgekit.runtime.base import GenerationStats, SamplingConfig  # noqa: E402

# WikiText's tokenization undone: " @-@ " joins, spaces before punctuation and inside brackets dropped
_UNDO = [(r" @(.)@ ", r"\1"), (r" ([.,;:!?%)\]])", r"\1"), (r"([(\[$]) ", r"\1"), (r" ('s|n't|'re|'ve|'ll|'d)\b", r"\1"),
         (r'" (.*?) "', r'"\1"')]


def clean_paragraphs(text: Path, n: int) -> list[str]:
    out = []
    for line in read_text(text).split("\n"):
        p = line.strip()
        if not 300 < len(p) < 700 or p.startswith("=") or "<unk>" in p:
            continue
        for pat, rep in _UNDO:
            p = re.sub(pat, rep, p)
        out.append(p)
    return out[::7][:n]


def with_typos(p: str, seed: int) -> str:
    """Every eighth word of five letters or more with two inner letters swapped (seeded)."""
    rng = random.Random(seed)
    words = p.split(" ")
    for i in range(3, len(words), 8):
        w = words[i]
        if len(w) >= 5 and w.isalpha():
            j = rng.randrange(1, len(w) - 2)
            words[i] = w[:j] + w[j + 1] + w[j] + w[j + 2 :]
    return " ".join(words)


def requests(text: Path) -> list[tuple[str, str]]:
    """(prompt, prediction) pairs: the text a request edits is its prediction."""
    out = []
    for i, p in enumerate(clean_paragraphs(text, 5)):
        out.append((f"Repeat the following paragraph exactly:\n\n{p}", p))
        typo = with_typos(p, i)
        out.append((f"Correct the spelling mistakes in the following paragraph and return it:\n\n{typo}", typo))
    return out


def decode_rate(st: GenerationStats) -> tuple[float, float]:
    decode = (st.extra.get("worker_total_time", st.total_time)
              - st.extra.get("worker_time_to_first_token", st.time_to_first_token))
    return decode, (st.generated_tokens - 1) / decode if decode > 0 else 0.0


def run_edgekit(target: Path, reqs: list[tuple[str, str]], max_tokens: int, threads: int, mode: str,
                answers: list[str] | None) -> list[dict[str, Any]]:
    opts: dict[str, Any] = {} if is_onnx(target) else {"flash_attn": True}
    if mode == "ngram":
        opts["speculative"] = "ngram"
    greedy = SamplingConfig(temperature=0, max_tokens=max_tokens)
    out = []
    with api.open_backend(target, n_ctx=2048, n_threads=threads, **opts) as b:
        "".join(b.generate([{"role": "user", "content": "Hi"}], SamplingConfig(temperature=0, max_tokens=8)))  # warm
        for i, (prompt, pred) in enumerate(reqs):
            sampling = greedy
            if mode.startswith("prediction"):
                assert answers is not None or mode == "prediction"
                sampling = dataclasses.replace(greedy, prediction=answers[i] if mode != "prediction" else pred)
            st = GenerationStats()
            text = "".join(b.generate([{"role": "user", "content": prompt}], sampling, st))
            decode, rate = decode_rate(st)
            spec = st.extra.get("speculative") or {}
            out.append({"text": text, "tokens": st.generated_tokens, "decode_s": decode, "tok_s": rate,
                        "drafted": spec.get("drafted", 0), "accepted": spec.get("accepted", 0)})
    return out


def render(report: dict[str, Any], out: Path) -> None:
    console = Console(record=True, width=150)
    table = Table(title=f"Predicted outputs, SmolLM2-135M-Instruct, {len(report['requests'])} edit requests, greedy, "
                        f"{report['max_tokens']} tokens, {report['threads']} threads, {report['rounds']} round(s); "
                        f"llama-cpp-python {report['llama_cpp_python']}")
    for col in ("target", "decoding", "tok/s", "vs plain", "drafted accepted", "identical"):
        table.add_column(col, justify="left" if col in ("target", "decoding") else "right")
    for r in report["rows"]:
        table.add_row(r["target"], r["mode"], f"{r['tok_s']:.1f}", f"{r['speedup']:.2f}x",
                      "-" if r["acceptance"] is None else f"{100 * r['acceptance']:.0f}% of {r['drafted']}",
                      f"{r['identical']}/{len(report['requests'])}")
    console.print(table)
    console.print("vs plain: decode speed over the same runtime's plain decoding in the same run (the peer's over its "
                  "own Llama without a draft model). identical: greedy answers token for token equal to that plain "
                  "decoding's.")
    for line in report["summary"]:
        console.print(line)
    write_report(report, console, out)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--text", type=Path, default=DEFAULT_TEXT)
    ap.add_argument("--targets", default="F16,Q8_0,onnx:16")
    ap.add_argument("--max-tokens", type=int, default=160)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=2, help="every mode this many times, interleaved; speeds averaged")
    ap.add_argument("--no-peer", action="store_true", help="skip llama-cpp-python's prompt-lookup drafting")
    ap.add_argument("--out", type=Path, default=RESULTS / "predicted_outputs")
    args = ap.parse_args(argv)

    hf = get_model()
    reqs = requests(args.text)
    rows: list[dict[str, Any]] = []
    summary: list[str] = []
    for tname in args.targets.split(","):
        target = build_target(hf, tname)
        modes = ["plain", "ngram", "prediction", "prediction = answer"]
        if not (args.no_peer or is_onnx(target)):
            modes += ["llama-cpp-python plain", "llama-cpp-python prompt lookup"]
        runs: dict[str, list[list[dict[str, Any]]]] = {m: [] for m in modes}
        for rnd in range(args.rounds):
            for m in modes:
                log(f"{tname}: {m}" + (f" (round {rnd + 1}/{args.rounds})" if args.rounds > 1 else ""))
                if m.startswith("llama-cpp-python"):
                    runs[m].append(run_peer(target, [p for p, _ in reqs], args.max_tokens, args.threads,
                                            lookup=m.endswith("lookup")))
                else:
                    answers = [r["text"] for r in runs["plain"][0]] if m == "prediction = answer" else None
                    runs[m].append(run_edgekit(target, reqs, args.max_tokens, args.threads, m, answers))
        speed = {m: statistics.mean(r["tok_s"] for res in rs for r in res) for m, rs in runs.items()}
        for m in modes:
            base = "llama-cpp-python plain" if m.startswith("llama-cpp-python") else "plain"
            drafted = sum(r.get("drafted", 0) for res in runs[m] for r in res)
            accepted = sum(r.get("accepted", 0) for res in runs[m] for r in res)
            same = sum(a["text"] == b["text"] for a, b in zip(runs[base][0], runs[m][0], strict=True))
            rows.append({"target": tname, "mode": m, "tok_s": speed[m], "speedup": speed[m] / speed[base],
                         "acceptance": accepted / drafted if drafted else None, "drafted": drafted,
                         "identical": same})
        pred = next(r for r in rows if r["target"] == tname and r["mode"] == "prediction")
        ngram = next(r for r in rows if r["target"] == tname and r["mode"] == "ngram")
        line = (f"{tname}: the request's prediction {pred['speedup']:.2f}x plain decoding "
                f"({speed['prediction']:.1f} against {speed['plain']:.1f} tok/s), prompt lookup {ngram['speedup']:.2f}x")
        if "llama-cpp-python prompt lookup" in speed:
            peer = next(r for r in rows if r["target"] == tname and r["mode"] == "llama-cpp-python prompt lookup")
            line += (f"; llama-cpp-python's prompt lookup {peer['speedup']:.2f}x its own plain decoding, "
                     f"{speed['llama-cpp-python prompt lookup']:.1f} tok/s: edgekit's prediction "
                     f"{speed['prediction'] / speed['llama-cpp-python prompt lookup']:.2f}x its speed")
        summary.append(line)
    report = {"date": dt.datetime.now().isoformat(timespec="seconds"), "cpu": cpu_model(), "machine": platform.machine(),
              "llama_cpp_python": pkg_version("llama_cpp_python"), "onnxruntime": pkg_version("onnxruntime"),
              "max_tokens": args.max_tokens, "threads": args.threads, "rounds": args.rounds,
              "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY"),
              "requests": [{"prompt": p, "prediction": q} for p, q in reqs], "rows": rows, "summary": summary}
    render(report, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
