"""Quality measurement: perplexity under llama-perplexity's protocol, and agreement with a reference.

Protocol (as llama.cpp's ``llama-perplexity``): the text is tokenized once, as plain text (special-token
text such as ``<unk>`` in WikiText is not parsed into control tokens: ``parse_special=false``); it is cut into
non-overlapping chunks of ``ctx`` tokens; each chunk is evaluated from an empty context (its first
token replaced by BOS when the vocabulary adds one) and only the second half is scored, so every
scored token sees at least ``ctx/2`` tokens of context. With a reference model, the same token ids
go through it and the scored positions also give KL(reference || artifact) and top-1 agreement.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from edgekit.errors import InputError

if TYPE_CHECKING:
    from edgekit.converters.formats.base import ProgressFn
    from edgekit.runtime.base import Backend


@dataclass(frozen=True)
class EvalConfig:
    """ctx: tokens per chunk (llama-perplexity's -c). chunks: at most this many chunks (None: all)."""

    ctx: int = 512
    chunks: int | None = None

    def __post_init__(self) -> None:
        for name, v in (("--ctx", self.ctx), ("--chunks", self.chunks)):
            if v is not None and (isinstance(v, bool) or not isinstance(v, int)):
                raise InputError(f"{name} must be a whole number, got {v!r}")
        if self.ctx < 8 or self.ctx % 2:
            raise InputError("--ctx must be an even number >= 8")
        if self.chunks is not None and self.chunks < 1:
            raise InputError("--chunks must be >= 1")


@dataclass
class EvalResult:
    """What an evaluation measured. ``ppl_stderr`` is the standard error of the perplexity estimate."""

    ctx: int
    chunks: int
    tokens_scored: int
    ppl: float
    ppl_stderr: float
    ref_ppl: float | None = None
    kl_mean: float | None = None
    kl_p99: float | None = None
    top1_agreement: float | None = None
    extra: dict[str, Any] = field(default_factory=dict)
    text_name: str | None = None  # what it was measured on: the text file's name and sha256, and the reference
    text_sha256: str | None = None
    ref: str | None = None

    def to_json(self) -> dict[str, Any]:
        return {k: v for k, v in asdict(self).items() if v is not None and v != {}}

    def provenance(self) -> str:
        """What the perplexity was measured on, in a few words (see :func:`provenance_label`)."""
        return provenance_label(self.to_json())


def text_identity(path: str | Path) -> tuple[str, str]:
    """A text file's name and sha256, recorded with every evaluation so a figure names what it measured."""
    from edgekit.hashing import sha256_file

    p = Path(path).expanduser()
    return p.name, sha256_file(p)


def text_name(e: dict[str, Any]) -> str:
    """The name of the text a recorded evaluation measured (older records keep only its path)."""
    return str(e.get("text_name") or (Path(str(e["text"])).name if e.get("text") else "unnamed text"))


def provenance_label(e: dict[str, Any]) -> str:
    """``valid.txt sha256:3f2a9c1e, 16 chunks x 512, ref SmolLM2-135M`` from a recorded evaluation (older
    records without a hash say so)."""
    name = text_name(e)
    sha = f"sha256:{str(e['text_sha256'])[:8]}" if e.get("text_sha256") else "no hash recorded"
    if e.get("kv_window"):
        shape = f"{e.get('tokens_scored', '?')} tokens through a KV window of {e['kv_window']}"
    else:
        n = e.get("chunks", "?")
        shape = f"{n} chunk{'' if n == 1 else 's'} x {e.get('ctx', '?')}"
    ref = f", ref {Path(str(e['ref'])).name}" if e.get("ref") else ""
    return f"{name} {sha}, {shape}{ref}"


def log_softmax(x: np.ndarray) -> np.ndarray:
    x = x.astype(np.float64)
    m = x.max(axis=-1, keepdims=True)
    return x - m - np.log(np.exp(x - m).sum(axis=-1, keepdims=True))


def bos_id(backend: Backend) -> int | None:
    """The BOS id the tokenizer adds, or None when it adds none."""
    with_special = backend.tokenize("a", add_special=True)
    without = backend.tokenize("a", add_special=False)
    return with_special[0] if len(with_special) > len(without) else None


def read_text(path: str | Path) -> str:
    p = Path(path).expanduser()
    if not p.is_file():
        raise InputError(f"{p} {'is a folder' if p.is_dir() else 'does not exist'}; give a plain-text file with --text")
    try:
        raw = p.read_bytes()
    except OSError as exc:
        raise InputError(f"cannot read {p}: {exc.strerror or exc}") from exc
    for bom, name in ((b"\xff\xfe\x00\x00", "UTF-32"), (b"\x00\x00\xfe\xff", "UTF-32"), (b"\xff\xfe", "UTF-16"),
                      (b"\xfe\xff", "UTF-16")):
        if raw.startswith(bom):
            raise InputError(f"{p} is {name} text (its byte-order mark says so); give it as UTF-8: iconv -f {name} "
                             f"-t UTF-8 {p.name} > {p.stem}.utf8.txt")
    try:
        # as its bytes say, as llama-perplexity reads them: CRLF kept; a UTF-8 byte-order mark is not text
        return raw.decode("utf-8").removeprefix("\ufeff")
    except UnicodeDecodeError as exc:
        raise InputError(f"{p} is not UTF-8 text (byte 0x{raw[exc.start]:02x} at offset {exc.start}); give a "
                         "plain-text file in UTF-8") from exc


def chunk_tokens(tokens: list[int], cfg: EvalConfig) -> list[list[int]]:
    n = len(tokens) // cfg.ctx
    if cfg.chunks is not None:
        n = min(n, cfg.chunks)
    if n == 0:
        raise InputError(
            f"the text has {len(tokens)} tokens, fewer than one chunk of {cfg.ctx}; give more text or a smaller --ctx"
        )
    return [tokens[i * cfg.ctx:(i + 1) * cfg.ctx] for i in range(n)]


def check_same_vocab(backend: Backend, ref: Backend) -> None:
    """KL and top-1 agreement compare the two models token by token: their vocabularies must be one."""
    n, n_ref = backend.n_vocab, ref.n_vocab
    if n != n_ref:
        raise InputError(f"--ref has a {n_ref}-token vocabulary but the model has {n}: they cannot be compared token "
                         "by token; give as --ref the float checkpoint this artifact was converted from")


def perplexity(
    backend: Backend,
    text: str,
    cfg: EvalConfig = EvalConfig(),
    ref: Backend | None = None,
    progress: ProgressFn | None = None,
) -> EvalResult:
    """Evaluate ``backend`` on ``text``; with ``ref``, also KL divergence and top-1 agreement."""
    if ref is not None:
        check_same_vocab(backend, ref)
    # special=False as llama-perplexity (parse_special=false): "<unk>" typed in WikiText stays text
    tokens = backend.tokenize(text, add_special=True, special=False)
    bos = bos_id(backend)
    chunks = chunk_tokens(tokens, cfg)
    first = cfg.ctx // 2
    nll: list[np.ndarray] = []
    ref_nll: list[np.ndarray] = []
    kls: list[np.ndarray] = []
    agree: list[np.ndarray] = []
    for i, chunk in enumerate(chunks):
        if progress:
            progress("evaluating", i, len(chunks))
        if bos is not None:
            chunk = [bos, *chunk[1:]]
        targets = np.asarray(chunk[first + 1:])
        lp = log_softmax(backend.logits(chunk)[first:-1])
        nll.append(-lp[np.arange(len(targets)), targets])
        if ref is not None:
            rlp = log_softmax(ref.logits(chunk)[first:-1])
            ref_nll.append(-rlp[np.arange(len(targets)), targets])
            kls.append((np.exp(rlp) * (rlp - lp)).sum(axis=-1))
            agree.append(rlp.argmax(-1) == lp.argmax(-1))
    if progress:
        progress("evaluating", len(chunks), len(chunks))
    all_nll = np.concatenate(nll)
    mean = float(all_nll.mean())
    # Standard error of exp(mean NLL) by the delta method, as llama-perplexity reports it.
    stderr = math.exp(mean) * float(all_nll.std(ddof=1) / math.sqrt(len(all_nll))) if len(all_nll) > 1 else 0.0
    result = EvalResult(ctx=cfg.ctx, chunks=len(chunks), tokens_scored=len(all_nll), ppl=math.exp(mean),
                        ppl_stderr=stderr)
    if ref is not None:
        kl = np.concatenate(kls)
        result.ref_ppl = math.exp(float(np.concatenate(ref_nll).mean()))
        result.kl_mean = float(kl.mean())
        result.kl_p99 = float(np.percentile(kl, 99))
        result.top1_agreement = float(np.concatenate(agree).mean())
    return result


# -- diffusion: digits-FID, precision/recall, label agreement ---------------------------------------

DIFFUSION_BATCH = 250  # images per sampling call: 1000 images in four runs of the sampler


@dataclass
class DiffusionTarget:
    """What a diffusion evaluation samples from: a denoiser (the sampler's ``model(x, t, labels)``
    protocol), its noise schedule, the sampler and step count it wants, and the image shape."""

    name: str
    denoiser: Any
    schedule: Any
    sampler: str
    steps: int
    num_classes: int
    shape: tuple[int, int, int]
    origin_steps: int = 50
    artifact: Any = None  # the Artifact whose manifest records the result (None for a pipeline folder)

    def close(self) -> None:
        """Free the denoiser (a PyTorch one gives the caller's torch thread count back)."""
        close = getattr(self.denoiser, "close", None)
        if close is not None:
            close()

    def __enter__(self) -> DiffusionTarget:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _manifest_task(path: Path) -> str | None:
    import json

    from edgekit.artifact import MANIFEST_NAME

    try:
        m = json.loads((path / MANIFEST_NAME).read_text())
    except (OSError, ValueError):
        return None
    return str(m.get("task")) if isinstance(m, dict) and m.get("task") else None


def is_diffusion(target: str | Path) -> bool:
    """Whether ``target`` is a diffusion model: a diffusers pipeline folder or an artifact whose manifest
    says ``"task": "diffusion"``."""
    from edgekit import library
    from edgekit.converters.diffusion.pipeline import is_pipeline

    p = library.resolve(target)
    return p.is_dir() and (is_pipeline(p) or _manifest_task(p) == "diffusion")


def open_diffusion(target: str | Path, threads: int | None = None) -> DiffusionTarget:
    """Open what ``evaluate_diffusion`` samples from: a diffusers pipeline folder (its UNet in PyTorch) or a
    diffusion artifact (its graphs in the runtime of its format), through :mod:`edgekit.runtime.diffusion`."""
    from edgekit import library
    from edgekit.artifact import Artifact
    from edgekit.converters.diffusion.pipeline import is_pipeline
    from edgekit.errors import UnsupportedError
    from edgekit.runtime.diffusion import open_diffusion as open_model

    p = library.resolve(target)
    if not p.exists():
        raise InputError(f"{p} does not exist; give a diffusers pipeline folder or a diffusion artifact"
                         f"{library.not_found_hint(target)}")
    task = _manifest_task(p) if p.is_dir() else None
    art = Artifact.open(p, verify=True) if task == "diffusion" or not (p.is_dir() and is_pipeline(p)) else None
    if art is not None and art.manifest.get("task") != "diffusion":
        raise UnsupportedError(f"{art.name} is a {art.format} language model, not a diffusion model: image "
                               f"metrics make no sense for it; measure it with 'edgekit eval {target} --text FILE'")
    m = open_model(p, threads=threads)
    d = m.defaults
    return DiffusionTarget(name=p.name, denoiser=m, schedule=m.schedule, sampler=d.sampler, steps=d.steps,
                           num_classes=m.num_classes, shape=(m.in_channels, m.sample_size, m.sample_size),
                           origin_steps=d.origin_steps, artifact=art)


def balanced_labels(n: int, num_classes: int) -> np.ndarray | None:
    """``n`` class labels, every class equally often (0, 1, ..., 9, 0, 1, ...); None for an unconditional model."""
    return (np.arange(n) % num_classes).astype(np.int64) if num_classes else None


def sample_images(model: DiffusionTarget, n: int, steps: int, sampler: str, cache_interval: int = 1,
                  seed: int = 0, batch: int = DIFFUSION_BATCH, progress: ProgressFn | None = None
                  ) -> tuple[np.ndarray, np.ndarray | None]:
    """``n`` images from ``model`` with balanced class labels (batch ``b`` starts from noise seeded
    ``seed * 100_003 + b``, so a run is a function of its arguments); returns (images, labels)."""
    from edgekit.converters.diffusion.sampler import SampleConfig, sample

    labels = balanced_labels(n, model.num_classes)
    nb = (n + batch - 1) // batch
    images = []
    for b in range(nb):
        lo, hi = b * batch, min(n, (b + 1) * batch)
        cfg = SampleConfig(sampler=sampler, steps=steps, cache_interval=cache_interval, seed=seed * 100_003 + b,
                           origin_steps=model.origin_steps)
        tick = None if progress is None else (lambda i, t, b=b: progress("sampling", b * t + i, nb * t))
        images.append(sample(model.denoiser, model.schedule, (hi - lo, *model.shape), cfg,
                             None if labels is None else labels[lo:hi], progress=tick))
    return np.concatenate(images), labels


def evaluate_diffusion(target: str | Path, n: int = 1000, steps: int | None = None, sampler: str | None = None,
                       cache_interval: int = 1, seed: int = 0, progress: ProgressFn | None = None,
                       record: bool = True, threads: int | None = None) -> dict[str, Any]:
    """Sample ``n`` images (classes balanced) from a diffusion pipeline folder or artifact and score them
    against the digits reference set: digits-FID, precision, recall (k=3), label agreement.

    ``steps``/``sampler`` default to what the model asks for (50 DDIM steps for a teacher, the distilled
    count for a consistency student); ``cache_interval`` > 1 samples with DeepCache. Compare models at
    the same ``n``: FID is biased by the sample size. ``floor`` is the FID of 1000 real held-out digits.
    The result is added to an artifact's manifest when ``record``. ``threads``: the sampler's (None: the
    runtime picks them for this machine's load)."""
    check_diffusion_options(n, steps, sampler, cache_interval)
    with open_diffusion(target, threads=threads) as model:  # closing it gives the caller's torch threads back
        result, _ = measure_diffusion(model, n, steps, sampler, cache_interval, seed, progress)
    if record and model.artifact is not None:
        model.artifact.record_eval(result)
    return result


def check_diffusion_options(n: int, steps: int | None, sampler: str | None, cache_interval: int) -> None:
    from edgekit.converters.diffusion.sampler import SAMPLERS

    if n < 10:
        raise InputError("--images must be at least 10 (FID and precision/recall need a sample; compare at 1000)")
    if steps is not None and steps < 1:
        raise InputError("--steps must be at least 1")
    if sampler is not None and sampler not in SAMPLERS:
        raise InputError(f"--sampler must be one of {', '.join(SAMPLERS)}")
    if cache_interval < 1:
        raise InputError("--cache-interval must be at least 1")


def measure_diffusion(model: DiffusionTarget, n: int = 1000, steps: int | None = None, sampler: str | None = None,
                      cache_interval: int = 1, seed: int = 0, progress: ProgressFn | None = None
                      ) -> tuple[dict[str, Any], np.ndarray]:
    """:func:`evaluate_diffusion` on an opened model: the result and the images it scored."""
    import json
    import time

    from edgekit import imagemetrics
    from edgekit.errors import UnsupportedError

    net = imagemetrics.FeatureNet.load()
    if model.shape != (1, imagemetrics.SIZE, imagemetrics.SIZE):
        raise UnsupportedError(f"{model.name} makes {'x'.join(map(str, model.shape))} images; the digits metrics "
                               "score 1x16x16 digits (the miniature) only")
    if model.num_classes not in (0, imagemetrics.NUM_CLASSES):
        raise UnsupportedError(f"{model.name} has {model.num_classes} classes; the digits metrics know 10")
    if cache_interval > 1 and not (hasattr(model.denoiser, "full") and hasattr(model.denoiser, "shallow")):
        raise UnsupportedError(f"{model.name} cannot cache features (no shallow graph): drop --cache-interval "
                               "or export the model with DeepCache")
    steps = steps or model.steps
    sampler = sampler or model.sampler
    t0 = time.perf_counter()
    try:
        images, labels = sample_images(model, n, steps, sampler, cache_interval, seed, progress=progress)
    except ValueError as exc:  # a step count the distillation grid cannot give
        raise InputError(f"{exc}; choose another --steps") from exc
    seconds = time.perf_counter() - t0
    scores = imagemetrics.score(images, labels, net)
    floor = json.loads(net.meta.get("record", "{}")).get("fid_floor_heldout")
    result = {"task": "diffusion", "metric": "digits-FID/1", **scores, "floor": floor, "steps": steps,
              "sampler": sampler, "cache_interval": cache_interval, "seed": seed, "seconds": round(seconds, 2),
              "images_per_second": round(n / seconds, 2) if seconds > 0 else None}
    return result, images


def diffusion_label(e: dict[str, Any]) -> str:
    """A recorded diffusion evaluation in a few words: ``digits-FID 12.3 (floor 11.1), precision 0.91,
    recall 0.88, labels 97.9%; ddim 4 steps, N=1000``."""
    def num(key: str, fmt: str) -> str:
        v = e.get(key)
        return "-" if not isinstance(v, (int, float)) else format(v, fmt)

    floor = f" (floor {e['floor']:.1f})" if isinstance(e.get("floor"), (int, float)) else ""
    labels = f", labels {100 * e['label_agreement']:.1f}%" if isinstance(e.get("label_agreement"), float) else ""
    cache = f", cache every {e['cache_interval']}" if (e.get("cache_interval") or 1) > 1 else ""
    return (f"digits-FID {num('fid', '.2f')}{floor}, precision {num('precision', '.3f')}, recall "
            f"{num('recall', '.3f')}{labels}; {e.get('sampler', '?')} {e.get('steps', '?')} steps{cache}, "
            f"N={e.get('n', '?')}")
