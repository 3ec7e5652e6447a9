"""Diffusers pipeline folders: read (safetensors only, no remote code), check, write.

A pipeline folder is what ``DiffusionPipeline.save_pretrained`` writes::

    model_index.json                     {"_class_name": ..., "unet": ["diffusers", "UNet2DModel"], ...}
    unet/config.json                     + diffusion_pytorch_model.safetensors
    scheduler/scheduler_config.json
    edgekit_diffusion.json               (edgekit's: how it was distilled, the sampler it wants)

A bare UNet folder (``config.json`` + safetensors) is read too, with a default DDPM schedule.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from edgekit.errors import CorruptFileError, InputError, MissingDependencyError, UnsupportedError

SUPPORTED_UNETS = ("UNet2DModel",)
# Blocks whose structure edgekit's exports, DeepCache split and quantizers know.
SUPPORTED_BLOCKS = ("DownBlock2D", "AttnDownBlock2D", "UpBlock2D", "AttnUpBlock2D", "UNetMidBlock2D")
CONSISTENCY_SCHEDULERS = ("LCMScheduler",)
EDGEKIT_FILE = "edgekit_diffusion.json"
WEIGHTS = "diffusion_pytorch_model.safetensors"
# Pipelines shipped in edgekit/data, taken by name where no folder of that name exists: the digits teacher and
# its distilled 4-step student (what ``quickstart --diffusion`` runs).
BUILTIN = ("digits-unet", "digits-unet-4step")


def builtin_pipeline(name: str) -> Path:
    """The folder of the pipeline edgekit ships as ``name`` (one of :data:`BUILTIN`)."""
    from importlib import resources

    return Path(str(resources.files("edgekit") / "data" / name))


def resolve_pipeline(path: str | Path) -> Path:
    """``path`` itself, or the shipped pipeline when it is a built-in name and no such folder exists here."""
    p = Path(path).expanduser()
    if not p.exists() and str(path) in BUILTIN:
        return builtin_pipeline(str(path))
    return p


def is_pipeline(path: Path) -> bool:
    """Whether ``path`` is a diffusers pipeline folder or a bare diffusers UNet folder."""
    p = Path(path)
    if (p / "model_index.json").is_file():
        return True
    cfg = p / "config.json"
    if not cfg.is_file():
        return False
    try:
        data = json.loads(cfg.read_text())
    except (OSError, ValueError):
        return False  # not a diffusers UNet: the checkpoint reader says what is wrong with it
    return isinstance(data, dict) and "UNet" in str(data.get("_class_name", ""))


@dataclass
class Pipeline:
    """A diffusion pipeline on disk.

    unet_dir: the folder with the UNet's ``config.json`` and safetensors.
    unet_config: that config; scheduler_config: the scheduler's (a default DDPM one for a bare UNet).
    info: ``edgekit_diffusion.json`` (sampler, steps, distillation record) or empty.
    """

    path: Path
    unet_dir: Path
    unet_config: dict[str, Any]
    scheduler_config: dict[str, Any]
    info: dict[str, Any] = field(default_factory=dict)

    @property
    def sample_size(self) -> int:
        s = self.unet_config.get("sample_size", 32)
        return int(s[0] if isinstance(s, (list, tuple)) else s)

    @property
    def in_channels(self) -> int:
        return int(self.unet_config.get("in_channels", 3))

    @property
    def num_classes(self) -> int:
        """Classes the UNet is conditioned on (0: unconditional)."""
        return int(self.unet_config.get("num_class_embeds") or 0)

    @property
    def sampler(self) -> str:
        """"consistency" for a distilled student (an LCM scheduler), else "ddim"."""
        if self.scheduler_config.get("_class_name") in CONSISTENCY_SCHEDULERS:
            return "consistency"
        return str(self.info.get("sampler", "ddim"))

    @property
    def origin_steps(self) -> int:
        """The timestep grid a consistency student was distilled on (its sampler picks steps from it)."""
        return int(self.scheduler_config.get("original_inference_steps") or self.info.get("origin_steps") or 50)

    @property
    def default_steps(self) -> int:
        return int(self.info.get("steps") or (4 if self.sampler == "consistency" else 50))

    @property
    def weights(self) -> Path:
        return self.unet_dir / WEIGHTS

    def schedule(self) -> Any:
        from edgekit.converters.diffusion.schedule import NoiseSchedule

        return NoiseSchedule.from_config(self.scheduler_config)

    def load_unet(self, dtype: Any = None) -> Any:
        """The UNet as a diffusers module in eval mode (float32 unless ``dtype``)."""
        return load_unet(self.unet_dir, self.unet_config, dtype)


def open_pipeline(path: str | Path) -> Pipeline:
    """Read a pipeline (or bare UNet) folder, or a built-in one by name (:data:`BUILTIN`); what edgekit cannot
    handle is refused in one line."""
    p = resolve_pipeline(path)
    if not p.exists():
        raise InputError(f"{p} does not exist; give a diffusers pipeline folder (model_index.json, unet/, scheduler/) "
                         f"or a built-in one: {', '.join(BUILTIN)}")
    if not p.is_dir():
        raise InputError(f"{p} is a file; give a diffusers pipeline folder (model_index.json, unet/, scheduler/)")
    index = _read_json(p / "model_index.json") if (p / "model_index.json").is_file() else None
    if index is None:
        if not is_pipeline(p):
            raise InputError(f"{p} is not a diffusers pipeline: it has no model_index.json nor a UNet config.json")
        unet_dir, sched = p, {"_class_name": "DDPMScheduler", "num_train_timesteps": 1000}
    else:
        if "unet" not in index:
            kind = index.get("_class_name", "this pipeline")
            raise UnsupportedError(f"{kind} has no UNet (transformer-based pipelines are not supported); "
                                   "give a UNet2DModel pipeline")
        unet_dir = p / "unet"
        sched_file = p / "scheduler" / "scheduler_config.json"
        sched = _read_json(sched_file) if sched_file.is_file() else {"_class_name": "DDPMScheduler"}
    cfg_file = unet_dir / "config.json"
    if not cfg_file.is_file():
        raise CorruptFileError(f"{unet_dir} has no config.json; the pipeline is incomplete: save it again")
    unet_config = _read_json(cfg_file)
    _check_unet(p, index, unet_dir, unet_config)
    info = _read_json(p / EDGEKIT_FILE) if (p / EDGEKIT_FILE).is_file() else {}
    pipe = Pipeline(path=p, unet_dir=unet_dir, unet_config=unet_config, scheduler_config=sched, info=info)
    pipe.schedule()  # an unsupported schedule is refused now, not after a long export
    return pipe


def _check_unet(p: Path, index: dict[str, Any] | None, unet_dir: Path, cfg: dict[str, Any]) -> None:
    cls = cfg.get("_class_name", "?")
    if cls == "UNet2DConditionModel":
        if index is not None and not (p / "text_encoder").is_dir():
            raise InputError(f"{p} is a text-to-image pipeline without its text_encoder/ folder; save the whole "
                             "pipeline (text_encoder, tokenizer, unet, scheduler)")
        raise UnsupportedError("text-conditioned UNets (UNet2DConditionModel) are not supported yet; edgekit "
                               "converts UNet2DModel pipelines (unconditional or class-conditional)")
    if cls not in SUPPORTED_UNETS:
        raise UnsupportedError(f"{cls} is not supported; edgekit converts {', '.join(SUPPORTED_UNETS)} pipelines")
    blocks = [*cfg.get("down_block_types", []), *cfg.get("up_block_types", []),
              *([cfg["mid_block_type"]] if cfg.get("mid_block_type") else [])]
    bad = sorted({b for b in blocks if b not in SUPPORTED_BLOCKS})
    if bad:
        raise UnsupportedError(f"UNet blocks {', '.join(bad)} are not supported (supported: "
                               f"{', '.join(SUPPORTED_BLOCKS)})")
    if cfg.get("class_embed_type") not in (None,):
        raise UnsupportedError(f"class_embed_type {cfg['class_embed_type']!r} is not supported; use num_class_embeds")
    if cfg.get("downsample_type", "conv") != "conv" or cfg.get("upsample_type", "conv") != "conv":
        raise UnsupportedError("only conv down/upsampling is supported (not resnet down/upsamplers)")
    if cfg.get("time_embedding_type", "positional") != "positional":
        raise UnsupportedError("only positional time embeddings are supported (not Fourier/score-SDE UNets)")
    if not (unet_dir / WEIGHTS).is_file():
        pickles = [f.name for f in unet_dir.glob("*.bin")] + [f.name for f in unet_dir.glob("*.pt*")]
        hint = f" (found {pickles[0]}: edgekit never loads pickles; re-save with safe_serialization)" if pickles else ""
        raise InputError(f"{unet_dir} has no {WEIGHTS}{hint}")


def _read_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        raise CorruptFileError(f"{path} is not valid JSON ({exc}); restore or re-save the pipeline") from exc
    if not isinstance(data, dict):
        raise CorruptFileError(f"{path} is not a JSON object; restore or re-save the pipeline")
    return data


def require_diffusers() -> Any:
    # Nothing here reaches for the hub (UNets are built from their config, weights read from local
    # safetensors), so the process's own HF_HUB_OFFLINE, which a host application may rely on, is left alone.
    try:
        import diffusers
    except ImportError as exc:
        raise MissingDependencyError("diffusion pipelines need diffusers: pip install 'edgekit[diffusion]'") from exc
    return diffusers


def load_unet(unet_dir: Path, config: dict[str, Any], dtype: Any = None) -> Any:
    """Build the UNet from its config and load the safetensors weights (strictly: every tensor present)."""
    import torch
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    diffusers = require_diffusers()
    cfg = {k: v for k, v in config.items() if not k.startswith("_")}
    try:
        model = diffusers.UNet2DModel.from_config(cfg)
    except (TypeError, ValueError) as exc:
        raise CorruptFileError(f"{unet_dir / 'config.json'} does not describe a UNet2DModel ({exc})") from exc
    try:
        state = load_file(str(unet_dir / WEIGHTS))
    except (SafetensorError, OSError) as exc:
        raise CorruptFileError(f"{unet_dir / WEIGHTS} is not a readable safetensors file ({exc}); re-save it") from exc
    missing, unexpected = model.load_state_dict(state, strict=False)
    if missing or unexpected:
        what = f"missing {missing[0]}" if missing else f"unexpected {unexpected[0]}"
        raise CorruptFileError(f"{unet_dir / WEIGHTS} does not match its config.json ({what}); re-save the pipeline")
    if dtype is not None and dtype != torch.float32:
        model = model.to(dtype)
    model.eval()
    return model


def save_pipeline(out: Path, unet: Any, scheduler_config: dict[str, Any], info: dict[str, Any] | None = None) -> None:
    """Write ``unet`` and its scheduler as a diffusers pipeline folder into ``out`` (an empty folder),
    loadable by ``diffusers.DDPMPipeline.from_pretrained`` as well as by edgekit."""
    from safetensors.torch import save_file

    diffusers = require_diffusers()
    out = Path(out)
    (out / "unet").mkdir(parents=True, exist_ok=True)
    (out / "scheduler").mkdir(exist_ok=True)
    cfg = {"_class_name": "UNet2DModel", "_diffusers_version": diffusers.__version__,
           **{k: v for k, v in dict(unet.config).items() if not k.startswith("_")}}
    (out / "unet" / "config.json").write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n")
    state = {k: v.detach().contiguous().float() for k, v in unet.state_dict().items()}
    save_file(state, str(out / "unet" / WEIGHTS))
    (out / "scheduler" / "scheduler_config.json").write_text(json.dumps(scheduler_config, indent=2) + "\n")
    index = {"_class_name": "DDPMPipeline", "_diffusers_version": diffusers.__version__,
             "scheduler": ["diffusers", scheduler_config.get("_class_name", "DDPMScheduler")],
             "unet": ["diffusers", "UNet2DModel"]}
    (out / "model_index.json").write_text(json.dumps(index, indent=2) + "\n")
    if info:
        (out / EDGEKIT_FILE).write_text(json.dumps(info, indent=2) + "\n")


def torch_denoiser(unet: Any) -> Any:
    """``unet`` as a sampler's denoiser: numpy in, numpy out, no gradients."""
    import numpy as np
    import torch

    def model(x: np.ndarray, t: int, labels: np.ndarray | None) -> np.ndarray:
        with torch.no_grad():
            tt = torch.full((x.shape[0],), int(t), dtype=torch.long)
            lab = None if labels is None else torch.as_tensor(labels, dtype=torch.long)
            return unet(torch.from_numpy(np.ascontiguousarray(x)), tt, class_labels=lab).sample.numpy()

    return model
