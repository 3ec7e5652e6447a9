"""The hot/cold sparse FFN as a GGUF that stock llama.cpp runs: a Qwen2-MoE file.

Why Qwen2-MoE (llama.cpp's ``qwen2moe`` graph, read in its ``build_moe_ffn``):
  * its attention is Llama's (RMSNorm, Q/K/V/O without required biases, GQA, NEOX rope: the rotation
    Hugging Face's Llama applies, so Q/K are written in the checkpoint's own row order);
  * its FFN is ``routed experts + shared expert``, all SwiGLU. The shared expert is always computed:
    it holds the hot neurons. The routed experts are the cold clusters, ``ffn_gate_inp`` is the router;
  * its gating is a plain softmax over the clusters with no renormalisation over the selected ones and
    no bias, so a cluster's weight is ``softmax(logits)_c``. The router's logits are scaled down to at
    most ``router_scale`` (1e-5): every weight is then ``1/E`` within ``~2 * router_scale`` whatever
    the input, and ``E`` (a power of two, so exact) is folded into ``ffn_down_exps``. The ranking of the
    logits, which top-k reads, is kept (fp32 resolves differences far below that scale);
  * the shared expert is gated by ``sigmoid(ffn_gate_inp_shexp . x)``; that vector is tiny too, so the
    gate is 1/2 (same tolerance) and 2 is folded into ``ffn_down_shexp``.
With every cluster selected (``expert_used_count = expert_count``) the layer is then the dense FFN to
float tolerance; with ``k`` selected it computes the hot set plus the router's ``k`` clusters. Routed
experts run through ``mul_mat_id``, which reads only the selected clusters' rows. Other routes read
worse: Mixtral-style ``llama`` MoE renormalises over the selected experts and has no shared expert;
DeepSeek/GLM-style sigmoid gating saturates only with a router bias, and their attention is not Llama's
(MLA, q/k norms); Llama 4 scales the expert *input* by a sigmoid and has no router bias.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import gguf
import numpy as np

import edgekit.converters.formats.gguf.mix_rules as mix_rules
import edgekit.converters.formats.gguf.mixes as mixes
from edgekit.calibration import CalibConfig
from edgekit.converters.formats.base import ConvertRecipe, ProgressFn
from edgekit.converters.quantize.base import Quantizer
from edgekit.converters.sparse_ffn.config import SparseFFNConfig
from edgekit.errors import InputError, UnsupportedError
from edgekit.model import HFCheckpoint

ARCH = "qwen2moe"
#: The dense FFN tensors the split replaces, and the role each sparse tensor takes its type from.
FFN_PARTS = ("ffn_gate", "ffn_up", "ffn_down")
SPARSE_TENSORS = {
    "ffn_gate_inp": None, "ffn_gate_inp_shexp": None,
    "ffn_gate_shexp": "ffn_gate", "ffn_up_shexp": "ffn_up", "ffn_down_shexp": "ffn_down",
    "ffn_gate_exps": "ffn_gate", "ffn_up_exps": "ffn_up", "ffn_down_exps": "ffn_down",
}
SHARED_GATE = 0.5  # sigmoid(~0): the shared expert's gate, compensated in ffn_down_shexp
#: A perfect router's FFN-output error above which (and above twice the unclustered top-k error) the layout
#: is flagged. Skipping half of SmolLM2-135M's neurons one by one moves each FFN's output by 9% and costs
#: +4.4% perplexity; its layout at that sparsity moves it by 37% with a perfect router (+164%).
CLUSTERS_POOR = 0.1


@dataclass
class SparseTensor:
    name: str
    shape: tuple[int, ...]  # numpy order
    qtype: gguf.GGMLQuantizationType
    make: Callable[[], np.ndarray]  # float32 values, numpy order

    @property
    def nbytes(self) -> int:
        block, size = gguf.GGML_QUANT_SIZES[self.qtype]
        return int(np.prod(self.shape[:-1], dtype=np.int64)) * (self.shape[-1] // block) * size


def _typed(name: str, shape: tuple[int, ...], wanted: gguf.GGMLQuantizationType) -> gguf.GGMLQuantizationType:
    info = mixes.TensorInfo(name=name, shape=tuple(reversed(shape)))
    return mix_rules.fallback(info, wanted)[0]


def calibrate(ckpt: HFCheckpoint, cfg: SparseFFNConfig, calib: CalibConfig, progress: ProgressFn) -> Any:
    """Run the neuron-statistics step with a split over every layer: the hot sets, clusters and routers."""
    from edgekit.converters.quantize.pipeline import LayerPipeline
    from edgekit.converters.quantize.steps.neuron_stats import NeuronStatsConfig, NeuronStatsStep

    step = NeuronStatsStep(NeuronStatsConfig(split=cfg))
    report: dict[str, Any] = {}
    # The pipeline keeps 512 sampled rows per batch; batches of 2 sequences give the routers 4x the
    # training tokens of the default 8 (same compute).
    LayerPipeline(calib, batch=2).run(ckpt, {}, [step], {}, report, progress)
    step.report = report
    return step


def plan_sparse(ckpt: HFCheckpoint, dense: list[Any], cfg: SparseFFNConfig, splits: dict[int, Any],
                ffn_norm: Callable[[int], np.ndarray]) -> list[SparseTensor]:
    """Every tensor of the sparse file, in file order: the dense plan's tensors with each layer's FFN
    replaced by its hot/cold form (types taken from the dense FFN tensor each part comes from)."""
    hp = ckpt.hparams
    n_ff = hp.n_ff
    hot_n, size, _ = cfg.shape(n_ff)
    E = cfg.clusters
    out: list[SparseTensor] = []
    by_name = {t.name: t for t in dense}

    def load(hf: str) -> Callable[[], np.ndarray]:
        return lambda: np.asarray(ckpt.load(hf), dtype=np.float32)

    for t in dense:
        if t.name.startswith("blk.") and t.name.split(".")[2] in FFN_PARTS:
            continue
        out.append(SparseTensor(t.name, tuple(t.shape), t.qtype, load(t.hf_name)))
        if t.name == "token_embd.weight" and "output.weight" not in by_name:
            # qwen2moe requires its own output tensor: the tied embedding, written twice.
            out.append(SparseTensor("output.weight", tuple(t.shape), t.qtype, load(t.hf_name)))
        m = t.name.split(".")
        if len(m) > 2 and m[0] == "blk" and m[2] == "ffn_norm":
            i = int(m[1])
            out.extend(_layer_tensors(ckpt, i, by_name, splits[i], (hot_n, size, E), cfg.router_scale, ffn_norm))
    return out


def _layer_tensors(ckpt: HFCheckpoint, i: int, by_name: dict[str, Any], split: Any, dims: tuple[int, int, int],
                   router_scale: float, ffn_norm: Callable[[int], np.ndarray]) -> Iterator[SparseTensor]:
    d = ckpt.hparams.n_embd
    hot_n, size, E = dims
    src = {p: by_name[f"blk.{i}.{p}.weight"] for p in FFN_PARTS}
    cache: dict[str, np.ndarray] = {}

    def dense(p: str) -> np.ndarray:
        if p not in cache:
            cache[p] = np.asarray(ckpt.load(src[p].hf_name), dtype=np.float32)
        return cache[p]

    hot, clusters = split.hot, split.clusters
    def router() -> np.ndarray:
        # The calibration tokens' largest logit lands at half of router_scale (a margin for new inputs).
        gain = router_scale / (2 * max(split.router_max_logit, 1e-30))
        return (split.router * gain).astype(np.float32)

    def shared_gate() -> np.ndarray:
        # |v . y| <= ||v|| ||y|| and ||y|| <= sqrt(d) max|ffn_norm| after RMSNorm: a hard bound.
        rng = np.random.default_rng(i)
        v = rng.standard_normal(d).astype(np.float64)
        bound = np.sqrt(d) * float(np.abs(ffn_norm(i)).max())
        return (v / np.linalg.norm(v) * (router_scale / max(bound, 1e-30))).astype(np.float32)

    specs: list[tuple[str, tuple[int, ...], gguf.GGMLQuantizationType, Callable[[], np.ndarray]]] = [
        ("ffn_gate_inp", (E, d), gguf.GGMLQuantizationType.F32, router),
        ("ffn_gate_inp_shexp", (d,), gguf.GGMLQuantizationType.F32, shared_gate),
        ("ffn_gate_shexp", (hot_n, d), src["ffn_gate"].qtype, lambda: dense("ffn_gate")[hot]),
        ("ffn_up_shexp", (hot_n, d), src["ffn_up"].qtype, lambda: dense("ffn_up")[hot]),
        ("ffn_down_shexp", (d, hot_n), src["ffn_down"].qtype,
         lambda: dense("ffn_down")[:, hot] / np.float32(SHARED_GATE)),
        ("ffn_gate_exps", (E, size, d), src["ffn_gate"].qtype, lambda: dense("ffn_gate")[clusters]),
        ("ffn_up_exps", (E, size, d), src["ffn_up"].qtype, lambda: dense("ffn_up")[clusters]),
        ("ffn_down_exps", (E, d, size), src["ffn_down"].qtype,
         lambda: np.stack([dense("ffn_down")[:, c] for c in clusters]) * np.float32(E)),
    ]
    for role, shape, wanted, make in specs:
        name = f"blk.{i}.{role}.weight"
        yield SparseTensor(name, shape, _typed(name, shape, wanted), make)


def encode(t: SparseTensor, quantizer: Quantizer) -> np.ndarray:
    w = t.make()
    if w.shape != t.shape:
        raise AssertionError(f"{t.name}: built {w.shape}, planned {t.shape}")
    if t.qtype in (gguf.GGMLQuantizationType.F32,):
        return np.ascontiguousarray(w, dtype=np.float32)
    rows = w.reshape(-1, w.shape[-1])
    return quantizer.quantize(t.name, rows, t.qtype)


def check_source(ckpt: HFCheckpoint, quantizer: Quantizer) -> None:
    if ckpt.spec.gguf_arch not in ("llama", "qwen2"):
        raise UnsupportedError(f"--sparse-ffn handles Llama-family SwiGLU models; {ckpt.spec.gguf_arch} is not one")
    if quantizer.config.method != "rtn":
        raise InputError("--sparse-ffn quantizes by round-to-nearest; drop --method (or use --method rtn)")


def hparams_kv(ckpt: HFCheckpoint, cfg: SparseFFNConfig) -> dict[str, object]:
    hot_n, size, k = cfg.shape(ckpt.hparams.n_ff)
    kv = {key.replace(f"{ckpt.spec.gguf_arch}.", f"{ARCH}.", 1): v
          for key, v in ckpt.hparams.gguf_kv(ckpt.spec.gguf_arch).items()}
    kv.update({f"{ARCH}.expert_count": cfg.clusters, f"{ARCH}.expert_used_count": k,
               f"{ARCH}.expert_feed_forward_length": size, f"{ARCH}.expert_shared_feed_forward_length": hot_n})
    return kv


def sparse_fields(cfg: SparseFFNConfig, ckpt: HFCheckpoint, step: Any) -> dict[str, Any]:
    """The manifest's ``sparse_ffn`` block: shape, achieved sparsity, router recall per layer."""
    hot_n, size, k = cfg.shape(ckpt.hparams.n_ff)
    splits = step.splits
    rec = [s.recall for s in splits.values()]
    return {"architecture": ARCH, "hot": hot_n, "clusters": cfg.clusters, "cluster_size": size, "used": k,
            "sparsity": round(cfg.achieved(ckpt.hparams.n_ff), 4), "router_scale": cfg.router_scale,
            "recall_mean": round(float(np.mean(rec)), 4),
            "static_recall_mean": round(float(np.mean([s.static_recall for s in splits.values()])), 4),
            "recall": {str(i): round(s.recall, 4) for i, s in splits.items()},
            "ffn_output_error": {name: round(float(np.mean([s.errors[name] for s in splits.values()])), 4)
                                 for name in ("router", "perfect_router", "top_k")},
            "calibration_s": getattr(step, "report", {}).get("total_s")}


def quality_note(fields: dict[str, Any]) -> str:
    """What the split costs each token's FFN output on held-out calibration tokens, and a warning when the
    layout itself (a perfect router) loses far more than skipping as many single neurons: then the model's
    active neurons do not cluster and no router makes the file a good trade."""
    e = fields["ffn_output_error"]
    text = (f"sparse FFN: on held-out calibration tokens each FFN's output is off by {e['router']:.0%} with the "
            f"trained router ({fields['recall_mean']:.0%} of each token's best clusters), {e['perfect_router']:.0%} "
            f"with a perfect router, {e['top_k']:.0%} skipping as many single neurons")
    if e["perfect_router"] > max(2 * e["top_k"], CLUSTERS_POOR):
        return ("warning: " + text + "; this model's active neurons do not cluster, so expect a large quality loss "
                "(edgekit neurons MODEL measures it; run, eval and profile --experts N run more clusters, 'all' "
                "the dense model)")
    return text + "; run, eval and profile --experts N trade speed for quality with this one file"


def ffn_norm_loader(ckpt: HFCheckpoint) -> Callable[[int], np.ndarray]:
    def get(i: int) -> np.ndarray:
        return np.asarray(ckpt.load(f"model.layers.{i}.post_attention_layernorm.weight"), dtype=np.float32)

    return get


def write_sparse(ckpt: HFCheckpoint, path: Path, recipe: ConvertRecipe, quantizer: Quantizer, cfg: SparseFFNConfig,
                 dense_plan: list[Any], progress: ProgressFn, header: Callable[[gguf.GGUFWriter], None]
                 ) -> tuple[list[SparseTensor], Any]:
    """Calibrate, split and write the sparse GGUF at ``path``; returns its tensors and the statistics step."""
    check_source(ckpt, quantizer)
    cfg.shape(ckpt.hparams.n_ff)  # a config that cannot fit fails before calibrating
    calib = recipe.calib or CalibConfig()
    step = calibrate(ckpt, cfg, calib, progress)
    plan = plan_sparse(ckpt, dense_plan, cfg, step.splits, ffn_norm_loader(ckpt))
    writer = gguf.GGUFWriter(path=None, arch=ARCH)
    header(writer)
    for t in plan:
        writer.add_tensor_info(t.name, t.shape, np.dtype(np.float32), t.nbytes, raw_dtype=t.qtype)
    try:
        writer.write_header_to_file(path)
        writer.write_kv_data_to_file()
        writer.write_ti_data_to_file()
        for n, t in enumerate(plan):
            progress(f"encoding {t.name} as {t.qtype.name}", n, len(plan))
            data = encode(t, quantizer)
            if data.nbytes != t.nbytes:
                raise AssertionError(f"{t.name}: encoder gave {data.nbytes} bytes, expected {t.nbytes}")
            writer.write_tensor_data(data)
    finally:
        writer.close()
    return plan, step
