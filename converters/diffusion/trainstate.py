"""Resumable training state without pickles: model, EMA and optimizer tensors in one safetensors file
whose header metadata holds the rest (step, optimizer groups, losses) as JSON. One file replaced atomically,
so a training (a teacher, a distillation) stopped with Ctrl-C or killed goes on from its last save, and the
step count always belongs to the tensors beside it. A state that cannot be read back (damaged, cut short,
or from another model) is discarded with a warning and training starts over, as healing does."""

from __future__ import annotations

import json
import os
import warnings
from pathlib import Path
from typing import Any

STATE = "train-state.safetensors"
OLD_META = "train-state.json"  # the two-file layout of earlier versions: removed, never read
_META_KEY = "edgekit.train"


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
    tmp = folder / (STATE + ".partial")
    save_file(tensors, str(tmp), metadata={_META_KEY: json.dumps(meta)})
    os.replace(tmp, folder / STATE)
    (folder / OLD_META).unlink(missing_ok=True)


class _Unreadable(ValueError):
    pass


def _read(folder: Path, model: Any, ema: Any, opt: Any) -> tuple[dict[str, Any], dict[str, Any], dict[str, Any]]:
    """(meta, tensors, optimizer state) of the saved state, checked against ``model``/``ema``/``opt``
    before any of them takes a value."""
    from safetensors import safe_open

    with safe_open(str(folder / STATE), framework="pt") as f:
        raw = (f.metadata() or {}).get(_META_KEY)
        if raw is None:
            raise _Unreadable("no step record in it")
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    meta = json.loads(raw)
    if not isinstance(meta, dict) or not isinstance(meta.get("step"), int) or meta["step"] < 0:
        raise _Unreadable("its step record is not a step count")
    for prefix, module in (("model.", model), ("ema.", ema)):
        want = {prefix + k: tuple(v.shape) for k, v in module.state_dict().items()}
        have = {k: tuple(v.shape) for k, v in tensors.items() if k.startswith(prefix)}
        if want != have:
            raise _Unreadable(f"its {prefix[:-1]} tensors do not match this model")
    if "rng" not in tensors:
        raise _Unreadable("no random-number state in it")
    flat = [p for g in opt.param_groups for p in g["params"]]
    groups = meta.get("param_groups")
    if not isinstance(groups, list) or len(groups) != len(opt.param_groups):
        raise _Unreadable("its optimizer groups do not match this model")
    state: dict[int, dict[str, Any]] = {}
    for k, v in tensors.items():
        if k.startswith("opt."):
            _, idx, name = k.split(".", 2)
            i = int(idx)
            if not 0 <= i < len(flat):
                raise _Unreadable(f"optimizer entry {k} is out of range")
            p = flat[i]
            if name == "step":
                v = v.reshape(())
            elif v.numel() == p.numel():
                v = v.reshape(p.shape)
            else:
                raise _Unreadable(f"optimizer entry {k} does not match its parameter")
            state.setdefault(i, {})[name] = v
    return meta, tensors, {"state": state, "param_groups": groups}


def load_state(folder: Path, model: Any, ema: Any, opt: Any) -> tuple[int, dict[str, Any]] | None:
    """Restore a saved state into ``model``/``ema``/``opt``; ``(step, extra)``, or None when there is none
    or it could not be read back (then it is discarded with a warning)."""
    import torch
    from safetensors import SafetensorError

    if not (folder / STATE).is_file():
        (folder / OLD_META).unlink(missing_ok=True)
        return None
    try:
        meta, tensors, opt_state = _read(folder, model, ema, opt)
    except (_Unreadable, OSError, ValueError, KeyError, TypeError, RuntimeError, SafetensorError) as exc:
        reason = str(exc) if isinstance(exc, _Unreadable) else f"{type(exc).__name__}: {exc}"
        warnings.warn(f"the saved training state in {folder} could not be read ({reason.splitlines()[0]}); "
                      "discarded it: training starts over", stacklevel=2)
        clear_state(folder)
        return None
    model.load_state_dict({k[6:]: v for k, v in tensors.items() if k.startswith("model.")})
    ema.load_state_dict({k[4:]: v for k, v in tensors.items() if k.startswith("ema.")})
    opt.load_state_dict(opt_state)
    torch.set_rng_state(tensors["rng"])
    return int(meta["step"]), dict(meta.get("extra") or {})


def saved_step(folder: Path) -> int | None:
    """The step of the state saved in ``folder``, read from its header alone; None when there is none (or
    it cannot be read)."""
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(folder / STATE), framework="pt") as f:
            meta = json.loads((f.metadata() or {})[_META_KEY])
        return int(meta["step"])
    except (OSError, ValueError, KeyError, TypeError, SafetensorError):
        return None


def clear_state(folder: Path) -> None:
    for name in (STATE, OLD_META, STATE + ".partial"):
        (folder / name).unlink(missing_ok=True)
