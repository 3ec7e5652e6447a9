"""Resumable training state without pickles: model, EMA and optimizer tensors in safetensors, the rest
in JSON, written atomically, so that a long training (a teacher, a distillation) stopped with Ctrl-C or
killed goes on from its last save."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from edgekit.errors import CorruptFileError

STATE = "train-state.safetensors"
META = "train-state.json"


def save_state(folder: Path, step: int, model: Any, ema: Any, opt: Any, extra: dict[str, Any]) -> None:
    """Write the state of step ``step`` into ``folder`` (replacing the previous one atomically)."""
    import torch
    from safetensors.torch import save_file

    folder.mkdir(parents=True, exist_ok=True)
    tensors = {f"model.{k}": v.detach().contiguous() for k, v in model.state_dict().items()}
    tensors.update({f"ema.{k}": v.detach().contiguous() for k, v in ema.state_dict().items()})
    opt_state = opt.state_dict()
    for idx, st in opt_state["state"].items():
        for name, v in st.items():
            tensors[f"opt.{idx}.{name}"] = torch.as_tensor(v).detach().contiguous().reshape(-1)
    tensors["rng"] = torch.get_rng_state()
    meta = {"step": step, "param_groups": opt_state["param_groups"], "extra": extra}
    tmp_state, tmp_meta = folder / (STATE + ".partial"), folder / (META + ".partial")
    save_file(tensors, str(tmp_state))
    tmp_meta.write_text(json.dumps(meta))
    os.replace(tmp_state, folder / STATE)  # tensors first: a meta file always has its tensors
    os.replace(tmp_meta, folder / META)


def load_state(folder: Path, model: Any, ema: Any, opt: Any) -> tuple[int, dict[str, Any]] | None:
    """Restore a saved state into ``model``/``ema``/``opt``; ``(step, extra)`` or None when there is none."""
    import torch
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    if not (folder / META).is_file() or not (folder / STATE).is_file():
        return None
    try:
        meta = json.loads((folder / META).read_text())
        tensors = load_file(str(folder / STATE))
    except (OSError, ValueError, SafetensorError) as exc:
        raise CorruptFileError(f"the training state in {folder} is unreadable ({exc}); delete it to start over") from exc
    model.load_state_dict({k[6:]: v for k, v in tensors.items() if k.startswith("model.")})
    ema.load_state_dict({k[4:]: v for k, v in tensors.items() if k.startswith("ema.")})
    opt_state: dict[str, Any] = {"state": {}, "param_groups": meta["param_groups"]}
    for k, v in tensors.items():
        if k.startswith("opt."):
            _, idx, name = k.split(".", 2)
            opt_state["state"].setdefault(int(idx), {})[name] = v
    flat = [p for g in opt.param_groups for p in g["params"]]
    for idx, st in opt_state["state"].items():
        p = flat[idx]
        for name, v in list(st.items()):
            st[name] = v.reshape(()) if name == "step" else v.reshape(p.shape)
    opt.load_state_dict(opt_state)
    torch.set_rng_state(tensors["rng"])
    return int(meta["step"]), dict(meta.get("extra", {}))


def clear_state(folder: Path) -> None:
    for name in (STATE, META):
        (folder / name).unlink(missing_ok=True)
