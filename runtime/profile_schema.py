"""The profiler's data: test specs, the result row (schema ``edgekit.profile/1``), statistics, and
llama.cpp's ``llama-bench -o json`` records parsed into the same rows."""

from __future__ import annotations

import math
import re
from dataclasses import asdict, dataclass, field, fields
from typing import Any

from edgekit.errors import InputError

SCHEMA = "edgekit.profile/1"
_TEST_RE = re.compile(r"^(?:pp(\d+))?(?:\+?tg(\d+))?(?:@d(\d+))?$")


@dataclass(frozen=True)
class TestSpec:
    """One llama-bench test: ``n_prompt`` tokens in one batch, then ``n_gen`` single-token decodes,
    after ``n_depth`` tokens already in the cache (prefilled, untimed)."""

    __test__ = False  # not a pytest class, despite its name
    n_prompt: int = 0
    n_gen: int = 0
    n_depth: int = 0

    def __post_init__(self) -> None:
        if self.n_prompt < 0 or self.n_gen < 0 or self.n_depth < 0 or self.n_prompt + self.n_gen == 0:
            raise InputError("a test needs prompt (pp) or generated (tg) tokens, none negative: e.g. pp512, tg128")

    @property
    def name(self) -> str:
        parts = ([f"pp{self.n_prompt}"] if self.n_prompt else []) + ([f"tg{self.n_gen}"] if self.n_gen else [])
        return "+".join(parts) + (f"@d{self.n_depth}" if self.n_depth else "")

    @property
    def n_tokens(self) -> int:
        return self.n_prompt + self.n_gen

    def with_depth(self, depth: int) -> TestSpec:
        return TestSpec(self.n_prompt, self.n_gen, self.n_depth + depth)


def parse_tests(text: str) -> tuple[TestSpec, ...]:
    """``"pp512,tg128,pp512+tg128,tg128@d4096"`` -> TestSpecs (llama-bench's names)."""
    out = []
    for item in (t.strip().lower() for t in text.split(",")):
        m = _TEST_RE.match(item) if item else None
        if not m or not (m.group(1) or m.group(2)):
            raise InputError(f"test {item!r} is not like pp512, tg128, pp512+tg128 or tg128@d4096")
        out.append(TestSpec(int(m.group(1) or 0), int(m.group(2) or 0), int(m.group(3) or 0)))
    return tuple(out)


def mean_std(values: list[float]) -> tuple[float | None, float | None]:
    """Mean and sample standard deviation (n-1, as llama-bench); None when there is nothing."""
    if not values:
        return None, None
    m = sum(values) / len(values)
    if len(values) < 2:
        return m, 0.0
    return m, math.sqrt(sum((v - m) ** 2 for v in values) / (len(values) - 1))


@dataclass
class ProfileRow:
    """One artifact x configuration x test, as ``edgekit profile --json`` writes it and the history keeps it."""

    test: str
    n_prompt: int
    n_gen: int
    n_depth: int
    artifact: dict[str, Any]
    config: dict[str, Any]
    status: str = "ok"
    error: str | None = None
    timestamp: str = ""
    source: str = "edgekit"
    method: str = "llamacpp-worker"
    backend: str = ""
    runtime: dict[str, Any] = field(default_factory=dict)
    host: dict[str, Any] = field(default_factory=dict)
    samples_s: list[float] = field(default_factory=list)
    ttft_samples_s: list[float] = field(default_factory=list)
    load_s: float | None = None
    peak_rss_bytes: int | None = None
    peak_vram_bytes: int | None = None
    energy: dict[str, Any] = field(default_factory=lambda: {"available": False, "reason": "not measured"})
    roofline: dict[str, Any] | None = None
    speculative: dict[str, Any] | None = None  # drafting rows (runtime/profile_drafting.py)
    schema: str = SCHEMA

    @property
    def reps(self) -> int:
        return len(self.samples_s)

    @property
    def samples_tps(self) -> list[float]:
        n = self.n_prompt + self.n_gen
        return [n / s for s in self.samples_s if s > 0]

    @property
    def tps(self) -> tuple[float | None, float | None]:
        return mean_std(self.samples_tps)

    def to_json(self) -> dict[str, Any]:
        d = asdict(self)
        d.pop("ttft_samples_s")
        tps_mean, tps_std = self.tps
        s_mean, s_std = mean_std(self.samples_s)
        ttft_mean, ttft_std = mean_std(self.ttft_samples_s)
        d.update(reps=self.reps, samples_tps=self.samples_tps, tps_mean=tps_mean, tps_stddev=tps_std,
                 s_mean=s_mean, s_stddev=s_std, ttft_s_mean=ttft_mean, ttft_s_stddev=ttft_std,
                 ttft_samples_s=list(self.ttft_samples_s))
        return d

    @property
    def label(self) -> str:
        """The test as a table shows it: a drafting row adds its acceptance, speed-up and identity."""
        s = self.speculative
        if not s:
            return self.test
        parts = [f"{100 * s['acceptance']:.0f}% accepted" if s.get("acceptance") is not None else "nothing drafted"]
        if s.get("speedup") is not None:
            parts.append(f"{s['speedup']:.2f}x")
        if s.get("identical") is False:
            parts.append("output differs")
        return f"{self.test} ({', '.join(parts)})"

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> ProfileRow:
        names = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in names})


def summarize(rows: list[ProfileRow]) -> list[dict[str, Any]]:
    """Table rows: artifact, test, config, tokens/s ± stddev, TTFT, load, peak RSS, roofline, energy."""
    out = []
    for r in rows:
        mean, std = r.tps
        ttft, _ = mean_std(r.ttft_samples_s)
        out.append({
            "artifact": r.artifact.get("name", "?"), "test": r.label,
            "threads": r.config.get("n_threads"), "batch": r.config.get("n_batch"), "ctx": r.config.get("n_ctx"),
            "ngl": r.config.get("n_gpu_layers"), "experts": r.config.get("n_expert_used"), "tps": mean, "tps_std": std, "reps": r.reps, "ttft_s": ttft,
            "load_s": r.load_s, "peak_rss_bytes": r.peak_rss_bytes,
            "roofline_fraction": (r.roofline or {}).get("fraction"),
            "j_per_token": r.energy.get("joules_per_token") if r.energy.get("available") else None,
            "status": r.status if not r.error else f"{r.status}: {r.error}",
        })
    return out


def from_llama_bench(records: dict[str, Any] | list[dict[str, Any]], artifact: dict[str, Any] | None = None) -> list[ProfileRow]:
    """Rows of this schema from ``llama-bench -o json`` output (a list of records, or one record).

    llama-bench measures neither load time, peak memory nor TTFT: those stay None.
    """
    if isinstance(records, dict):
        records = [records]
    rows = []
    for rec in records:
        try:
            n_prompt, n_gen, n_depth = int(rec.get("n_prompt", 0)), int(rec.get("n_gen", 0)), int(rec.get("n_depth", 0))
            samples = [float(ns) / 1e9 for ns in rec.get("samples_ns") or []]
        except (TypeError, ValueError) as exc:
            raise InputError(f"not a llama-bench JSON record ({exc}); produce it with `llama-bench -o json`") from None
        if not samples and rec.get("avg_ns"):
            samples = [float(rec["avg_ns"]) / 1e9]
        if n_prompt + n_gen == 0 or not samples:
            raise InputError("a llama-bench record needs n_prompt/n_gen and samples_ns; use `llama-bench -o json`")
        spec = TestSpec(n_prompt, n_gen, n_depth)
        art = dict(artifact or {})
        art.setdefault("name", str(rec.get("model_filename", "?")).rsplit("/", 1)[-1])
        art.setdefault("path", rec.get("model_filename"))
        art.setdefault("format", "gguf")
        art.setdefault("size_bytes", rec.get("model_size"))
        art.setdefault("n_params", rec.get("model_n_params"))
        art.setdefault("model_type", rec.get("model_type"))
        rows.append(ProfileRow(
            test=spec.name, n_prompt=n_prompt, n_gen=n_gen, n_depth=n_depth, artifact=art,
            config={"n_threads": rec.get("n_threads"), "n_batch": rec.get("n_batch"), "n_ubatch": rec.get("n_ubatch"),
                    "n_ctx": None, "n_gpu_layers": rec.get("n_gpu_layers"), "type_k": rec.get("type_k"),
                    "type_v": rec.get("type_v"), "flash_attn": rec.get("flash_attn"),
                    "offload_kqv": not rec.get("no_kv_offload", False), "tensor_overrides": [],
                    "use_mmap": rec.get("use_mmap")},
            timestamp=str(rec.get("test_time", "")), source="llama-bench", method="llama-bench", backend="llamacpp",
            runtime={"llama_cpp_build": rec.get("build_commit"), "build_number": rec.get("build_number"),
                     "backends": rec.get("backends")},
            host={"cpu": rec.get("cpu_info"), "gpus": [rec["gpu_info"]] if rec.get("gpu_info") else []},
            samples_s=samples,
            energy={"available": False, "reason": "llama-bench does not measure energy"},
        ))
    return rows
