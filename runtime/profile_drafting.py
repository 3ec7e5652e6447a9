"""Speculative decoding in ``edgekit profile``: decode speed with and without a drafter on real greedy
generations, the acceptance rate, and whether the drafted output stayed token-identical.

llama-bench's ``tg`` tests decode tokens no drafter can predict, so a drafter's worth (which depends on
the text) is measured here on a prompt (``--prompt``; by default a rewrite task, where prompt lookup has
something to copy). Each drafter and the plain baseline run in a backend of their own with the same
options and flash attention on (without it llama.cpp's batched verification never gives the logits of
one-token steps on CPUs; with it, bit for bit for Q8_0 and Q4_0 under 256 cached tokens, within rounding
elsewhere, so a near-tie can flip a greedy token: the row says "output differs"). Decode speed is
the worker's own (generated − 1) / (time after the first token), so no pipe traffic is in it.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from edgekit.artifact import Artifact, now_iso
from edgekit.errors import BackendError, InputError
from edgekit.runtime.profile_schema import ProfileRow

DEFAULT_PROMPT = (
    "Rewrite the following paragraph in plain words, keeping every fact and name:\n\n"
    "The lighthouse at Cape Morrow was built in 1871 from granite quarried on the island itself. Its lamp, "
    "first fed with whale oil and later with kerosene, was electrified in 1934, and the last keeper, Ellen "
    "Price, left the station in 1962 when the light was automated. Today the tower belongs to a local "
    "trust, which opens it to visitors on summer weekends and keeps a small museum in the keeper's cottage."
)


def drafter_options(spec: str) -> tuple[str, dict[str, Any]]:
    """``"ngram"`` or a draft model's path -> (the row's name for it, the backend options that select it)."""
    if spec == "ngram":
        return "ngram", {"speculative": "ngram"}
    path = Path(spec).expanduser()
    if not path.exists():
        raise InputError(f"draft model not found: {spec} (give an artifact folder or model file in the target's format, or 'ngram')")
    return f"draft:{path.name if path.is_dir() else path.stem}", {"draft": str(path)}


def drafting_rows(art: Artifact, info: dict[str, Any], drafters: Sequence[str], *, options: dict[str, Any],
                  config: dict[str, Any], host: dict[str, Any], prompt: str, n_gen: int, reps: int,
                  backend_name: str | None = None, cancelled: Callable[[], bool] = lambda: False,
                  on_row: Callable[[ProfileRow], None] | None = None) -> list[ProfileRow]:
    """Rows ``gen<n>`` (plain) and ``gen<n>+<drafter>`` for each of ``drafters`` (see
    :func:`drafter_options`), ``reps`` greedy generations each; every drafter row carries a ``speculative``
    block (drafted, accepted, acceptance, identical, speedup against the plain row)."""
    from edgekit.runtime.base import GenerationStats, SamplingConfig, open_backend

    modes = [("plain", {})] + [drafter_options(d) for d in drafters]
    messages = [{"role": "user", "content": prompt}]
    greedy = SamplingConfig(temperature=0, max_tokens=n_gen)
    rows: list[ProfileRow] = []
    # llama.cpp: flash attention on for every row (see the module's note); onnxruntime has no such option
    fa = {"flash_attn": True} if art.format == "gguf" else {}
    plain: ProfileRow | None = None
    plain_text: str | None = None
    for name, extra in modes:
        if cancelled():
            break
        row = ProfileRow(test=f"gen{n_gen}" + ("" if name == "plain" else f"+{name}"), n_prompt=0, n_gen=0,
                         n_depth=0, artifact=info, config={**config, **fa}, timestamp=now_iso(),
                         method="llamacpp-worker" if fa else "generic", backend=backend_name or "", host=host)
        try:
            backend = open_backend(art, backend_name, **{**options, **fa, **extra})
        except (BackendError, InputError) as exc:
            row.status, row.error = "error", str(exc)
            rows.append(row)
            if on_row:
                on_row(row)
            continue
        drafted = accepted = 0
        text = ""
        try:
            row.backend = getattr(backend, "name", row.backend)
            row.load_s = float(getattr(backend, "load_time", 0.0) or 0.0) or None
            "".join(backend.generate([{"role": "user", "content": "Hi"}], SamplingConfig(temperature=0, max_tokens=8)))
            for _ in range(reps):
                if cancelled():
                    row.status = "interrupted"
                    break
                st = GenerationStats()
                text = "".join(backend.generate(messages, greedy, st))
                first = st.extra.get("worker_time_to_first_token", st.time_to_first_token)
                decode = st.extra.get("worker_total_time", st.total_time) - first
                if st.generated_tokens < 2 or decode <= 0:
                    raise InputError("the prompt ended after one token; give a --prompt that asks for a longer answer")
                row.n_gen = st.generated_tokens - 1
                row.samples_s.append(decode)
                row.ttft_samples_s.append(first)
                spec = st.extra.get("speculative") or {}
                drafted += int(spec.get("drafted", 0))
                accepted += int(spec.get("accepted", 0))
        except (BackendError, InputError) as exc:  # this row fails; the rows measured so far are kept
            row.status, row.error = "error", str(exc)
        finally:
            backend.close()
        if name == "plain":
            plain, plain_text = row, text
        else:
            base, _ = plain.tps if plain is not None else (None, None)
            tps, _ = row.tps
            row.speculative = {"drafter": name, "drafted": drafted, "accepted": accepted,
                               "acceptance": accepted / drafted if drafted else None,
                               "identical": None if plain_text is None or not row.samples_s else text == plain_text,
                               "speedup": tps / base if tps and base else None}
        rows.append(row)
        if on_row:
            on_row(row)
    return rows
