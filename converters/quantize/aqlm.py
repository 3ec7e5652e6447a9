"""AQLM: additive codebook quantization (Egiazarian et al., 2024) as a calibrated method of one rounding
step (:mod:`.steps.aqlm_round`, kernel :mod:`.aqlm_kernel`), run by the layer pipeline. The scheme (``2x8``,
``1x16``, ...) is the format's plan; this config holds how hard the encoder works. It writes Hugging Face
AQLM checkpoints (``--to aqlm``), which transformers runs with the ``aqlm`` package.

With ``distill`` (``--distill 20m``), AQLM's fine-tuning follows the layer-wise encoding: the codes stay fixed
and every linear's codebooks and row scales, and the norms, are trained together so that the whole quantized
model matches the float model's next-token distributions (``KL(teacher || student)`` on the calibration
sequences), by the time-bounded, resumable distillation loop pruning's ``--heal`` uses
(:func:`edgekit.converters.structure.heal.heal`). The embedding and the head stay as they are (as the file
stores them: an fp8 embedding in its fp8 values)."""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from edgekit.converters.quantize.aqlm_kernel import AQLMTensor
from edgekit.converters.quantize.base import register_quantizer
from edgekit.converters.quantize.calibrated import CalibratedConfig, CalibratedQuantizer
from edgekit.converters.quantize.pipeline import round_stored_floats
from edgekit.converters.quantize.steps import StepConfig
from edgekit.converters.quantize.steps.aqlm_round import AQLMRoundConfig
from edgekit.converters.quantize.steps.base import F8_E4M3
from edgekit.errors import InputError

if TYPE_CHECKING:
    from collections.abc import Callable

    import gguf

    from edgekit.model import HFCheckpoint


_CACHE_VERSION = 1


@dataclass(frozen=True)
class AQLMConfig(CalibratedConfig):
    """rounds / beam / cg_iters / damp: :class:`AQLMRoundConfig`'s. distill: a ``HealConfig`` (minutes, lr,
    batch...) for the fine-tuning of codebooks, scales and norms after the encoding, or None. Shared fields:
    :class:`CalibratedConfig`."""

    method: str = "aqlm"
    rounds: int = 3
    beam: int = 4
    cg_iters: int = 30
    damp: float = 0.01
    distill: Any = None

    def to_json(self) -> dict[str, Any]:
        d = super().to_json()
        d["distill"] = None if self.distill is None else asdict(self.distill)
        return d

    def __post_init__(self) -> None:
        super().__post_init__()
        for s in self.extra_steps:
            if s.stage > 10:  # pruning masks and other rounding steps do not apply to codebooks
                raise InputError(f"AQLM encodes every linear itself; drop the {s.step} step")

    def method_steps(self) -> tuple[StepConfig, ...]:
        return (AQLMRoundConfig(rounds=self.rounds, beam=self.beam, cg_iters=self.cg_iters, damp=self.damp),)


@register_quantizer("aqlm")
class AQLMQuantizer(CalibratedQuantizer):
    """Runs the recipe in :meth:`prepare`; :meth:`take` hands out each linear's
    :class:`~edgekit.converters.quantize.aqlm_kernel.AQLMTensor` (or a float tensor's bytes)."""

    config_class = AQLMConfig
    parallel_safe = False

    def __init__(self, config: AQLMConfig | None = None) -> None:
        super().__init__(config)
        self._tuned: dict[str, np.ndarray] = {}  # the fine-tuned norms (HF name -> weights), with distill
        self._names: dict[str, str] = {}  # GGUF name -> HF name
        self._plan: dict[str, Any] = {}

    def prepare(self, checkpoint: HFCheckpoint, plan: dict[str, gguf.GGMLQuantizationType],
                progress: Callable[[str, int, int], None] | None = None) -> None:
        """Encode every layer (or take the encoding of an identical earlier run from edgekit's cache: the
        same weights, plan, encoder settings and calibration), then fine-tune with ``distill``."""
        from edgekit.fsutil import edgekit_home

        self._plan = dict(plan)
        cache = edgekit_home() / "aqlm" / self._cache_key(checkpoint, plan)
        if (cache / "report.json").exists() and self._load_cached(cache):
            if progress:
                progress(f"AQLM encoding reused from {cache}", 1, 1)
        else:
            super().prepare(checkpoint, plan, progress)
            self._save(cache)
        cfg: AQLMConfig = self.config  # type: ignore[assignment]
        if cfg.distill is not None:
            self._names = {g: n for n in checkpoint.tensors if (g := checkpoint.spec.gguf_name(n)) is not None}
            self.report["distill"] = self._finetune(checkpoint, progress)

    def _cache_key(self, checkpoint: HFCheckpoint, plan: dict[str, Any]) -> str:
        from edgekit.hashing import sha256_file, sha256_files

        cfg: AQLMConfig = self.config  # type: ignore[assignment]
        calib = cfg.calib.describe()
        if cfg.calib.source != "self":  # the text, not where it lies
            calib["source"] = sha256_file(Path(cfg.calib.source).expanduser())
        steps = [c.to_json() for c in cfg.steps()]
        blob = json.dumps({"src": sha256_files(checkpoint.weight_files), "plan": {k: str(getattr(v, "name", v))
                           for k, v in sorted(plan.items())}, "schemes": sorted({repr(v) for v in plan.values()}),
                           "steps": steps, "calib": calib, "sink": cfg.sink_weight, "v": _CACHE_VERSION},
                          sort_keys=True)
        return hashlib.sha256(blob.encode()).hexdigest()[:20]

    def _save(self, cache: Path) -> None:
        """The encoding (codes, codebooks, scales; float tensors' bytes) and the report, written whole or
        not at all."""
        import os
        import shutil
        import tempfile
        import warnings

        from safetensors.numpy import save_file

        arrays: dict[str, np.ndarray] = {}
        meta: dict[str, Any] = {}
        for g, t in self._bytes.items():
            if isinstance(t, AQLMTensor):
                arrays[f"{g}.codes"] = t.codes.astype(np.int32)
                arrays[f"{g}.codebooks"], arrays[f"{g}.scales"] = t.codebooks, t.scales
                meta[g] = {"scheme": [t.scheme.num_codebooks, t.scheme.nbits, t.scheme.in_group],
                           "error": t.error, "rel_error": t.rel_error}
            else:
                arrays[f"{g}.raw"] = np.ascontiguousarray(t)
        tmp = None
        try:
            cache.parent.mkdir(parents=True, exist_ok=True)
            tmp = Path(tempfile.mkdtemp(dir=cache.parent, prefix=f".{cache.name}-"))
            save_file(arrays, str(tmp / "encoded.safetensors"))
            (tmp / "report.json").write_text(json.dumps({"report": self.report, "tensors": meta}))
            os.replace(tmp, cache)
        except Exception as exc:  # noqa: BLE001 - a cache that cannot be written is only a lost shortcut
            # (safetensors reports a full disk as SafetensorError, not OSError)
            if tmp is not None:
                shutil.rmtree(tmp, ignore_errors=True)
            reason = (getattr(exc, "strerror", None) or str(exc) or type(exc).__name__).splitlines()[0]
            warnings.warn(f"the AQLM encoding could not be cached in {cache.parent} ({reason}); going on without: "
                          "free some space there, or set EDGEKIT_HOME to another folder", stacklevel=2)

    def _load_cached(self, cache: Path) -> bool:
        """Take the encoding cached in ``cache``; False (with a warning, and the entry removed) when it cannot
        be read: it is then encoded again, as on a miss."""
        import shutil
        import warnings

        from safetensors import SafetensorError

        try:
            self._load(cache)
        except (OSError, ValueError, KeyError, TypeError, IndexError, SafetensorError) as exc:
            self._bytes.clear()
            self.report = {}
            reason = f"{type(exc).__name__}: {exc}".splitlines()[0]
            warnings.warn(f"the AQLM encoding cached in {cache} could not be read ({reason}); discarded it: "
                          "encoding again", stacklevel=3)
            shutil.rmtree(cache, ignore_errors=True)
            return False
        return True

    def _load(self, cache: Path) -> None:
        from safetensors.numpy import load_file

        from edgekit.converters.quantize.aqlm_kernel import AQLMScheme

        info = json.loads((cache / "report.json").read_text())
        arrays = load_file(str(cache / "encoded.safetensors"))
        self.report = info["report"]
        for key, arr in arrays.items():
            g, part = key.rsplit(".", 1)
            if part == "raw":
                self._bytes[g] = arr
            elif part == "codes":
                m = info["tensors"][g]
                self._bytes[g] = AQLMTensor(AQLMScheme(*m["scheme"]), arr.astype(np.int64), arrays[f"{g}.codebooks"],
                                            arrays[f"{g}.scales"], error=m["error"], rel_error=m["rel_error"])

    def _finetune(self, checkpoint: HFCheckpoint, progress: Callable[[str, int, int], None] | None) -> dict[str, Any]:
        import torch
        from safetensors import safe_open

        from edgekit.converters.quantize.steps.aqlm_round import to_file_precision
        from edgekit.converters.structure.heal import heal

        cfg: AQLMConfig = self.config  # type: ignore[assignment]
        encoded = {self._names[g].removesuffix(".weight"): t for g, t in self._bytes.items()
                   if isinstance(t, AQLMTensor)}
        digest = hashlib.sha256()
        for name in sorted(encoded):
            digest.update(encoded[name].codes.astype(np.int32).tobytes())
            digest.update(encoded[name].codebooks.tobytes())
        fp8 = sorted(g for g, t in self._plan.items() if t == F8_E4M3)  # the student computes with stored values
        key = f"aqlm:{digest.hexdigest()[:16]}" + "".join(f":fp8:{g}" for g in fp8)

        def student(model: Any) -> int:
            round_stored_floats(torch, model, self._plan)
            return install_codebooks(torch, model, encoded)

        info = heal(checkpoint, checkpoint.path, key, cfg.distill, cfg.calib, progress, prepare_student=student,
                    in_place=False, what="AQLM fine-tuning")
        with safe_open(str(Path(info["state"]) / "student.safetensors"), framework="numpy") as f:
            for module, t in encoded.items():
                t.codebooks = np.asarray(f.get_tensor(f"{module}.aqlm_codebooks"), np.float32)
                t.scales = np.asarray(f.get_tensor(f"{module}.aqlm_scales"), np.float32)
                to_file_precision(t)
            self._tuned = {k: np.asarray(f.get_tensor(k), np.float32) for k in f.keys()
                           if k.endswith("norm.weight")}
        return info

    def take(self, name: str) -> object:
        if name not in self._bytes:
            raise InputError(f"AQLM did not encode {name}; run prepare() with a plan that names it")
        return self._bytes.pop(name)

    def quantize(self, name: str, weight: np.ndarray, qtype: object) -> np.ndarray:
        if name in self._bytes and not isinstance(self._bytes[name], np.ndarray):
            raise InputError(f"{name} is AQLM-encoded; the AQLM format reads it with take()")
        if weight.ndim == 1 and self._names.get(name) in self._tuned:  # the fine-tuned norms
            weight = self._tuned[self._names[name]]
        return super().quantize(name, weight, qtype)  # type: ignore[arg-type]


def install_codebooks(torch: Any, model: Any, encoded: dict[str, AQLMTensor]) -> int:
    """Make each linear named in ``encoded`` (module name -> its encoding) compute with the weights its fixed
    codes select from trainable codebooks (``aqlm_codebooks``) times trainable row scales (``aqlm_scales``);
    the float weight is frozen and unused, the embedding and the head are frozen. Returns how many changed."""
    import types

    def forward(self: Any, x: Any) -> Any:
        books, codes = self.aqlm_codebooks, self.aqlm_codes
        w = torch.nn.functional.embedding(codes[..., 0].long(), books[0])
        for m in range(1, codes.shape[-1]):
            w = w + torch.nn.functional.embedding(codes[..., m].long(), books[m])
        w = w.reshape(self.out_features, self.in_features) * self.aqlm_scales[:, None]
        return torch.nn.functional.linear(x, w, self.bias)

    model.get_input_embeddings().weight.requires_grad_(False)
    model.get_output_embeddings().weight.requires_grad_(False)
    n = 0
    for name, module in model.named_modules():
        t = encoded.get(name)
        if t is None:
            continue
        module.weight.requires_grad_(False)
        module.register_buffer("aqlm_codes", torch.from_numpy(t.codes.astype(np.int32)))
        module.aqlm_codebooks = torch.nn.Parameter(torch.from_numpy(t.codebooks.copy()))
        module.aqlm_scales = torch.nn.Parameter(torch.from_numpy(t.scales.copy()))
        module.forward = types.MethodType(forward, module)
        n += 1
    return n
