"""The closed-form first stage of healing a width-pruned model: refit what each narrowed block writes.

Width pruning removes FFN neurons (and attention heads), and with them what they added to the residual
stream. Before gradient distillation, each projection that writes a narrowed module's output into the
residual stream (``mlp.down_proj``; ``self_attn.o_proj`` when heads were removed) is refit, block by block
from the first, so that the student's residual stream after it matches the teacher's at the same point
given the student's own inputs. Each is a ridge regression on calibration activations, solved exactly:
for a projection ``W`` with inputs ``H`` (the kept neurons' activations, or the kept heads' outputs) and
target ``Y`` (the teacher's residual stream there, less the student's residual before the module),
``W = (HᵀH + λ·mean(diag HᵀH)·I)⁻¹ HᵀY``. Because the target is the teacher's stream and the inputs are the
student's, a block also corrects what earlier blocks left wrong. This is distillation of hidden states,
one linear map at a time; gradient distillation on logits then trains every weight together.

The zero-padded neurons of per-block widths (``width:auto``) have zero activations, so the regularised
solve leaves their columns at exactly zero.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from collections.abc import Callable


def refit_narrowed(teacher: Any, student: Any, ids: Any, *, attn: bool, ffn: bool, ridge: float = 1e-4,
                   batch: int = 8, progress: Callable[[str, int, int], None] | None = None) -> Any:
    """Refit the student's ``o_proj`` (``attn``) and ``down_proj`` (``ffn``) of every block in place, from
    the calibration token ids ``ids`` (sequences × tokens). Both models are Hugging Face Llama-family
    models with the same number of blocks and the same hidden size. Returns the teacher's residual stream
    after its last block on ``ids`` (sequences × tokens × hidden; None when there was nothing to refit):
    its logits are ``teacher.lm_head(teacher.model.norm(...))``, which distillation then need not recompute."""
    import torch

    from edgekit.converters.quantize.pipeline import LayerPipeline

    if not (attn or ffn):
        return None
    n = len(student.model.layers)
    with torch.no_grad():
        hs, kws = LayerPipeline.first_layer_inputs(torch, student, ids, batch)
        ht = [h.clone() for h in hs]
        for i, (ls, lt) in enumerate(zip(student.model.layers, teacher.model.layers, strict=True)):
            if progress:
                progress(f"healing: refitting block {i + 1}/{n}", i, n)
            mid_t = [h + lt.self_attn(hidden_states=lt.input_layernorm(h), **kw)[0] for h, kw in zip(ht, kws, strict=True)]
            out_t = [m + lt.mlp(lt.post_attention_layernorm(m)) for m in mid_t]
            # the student's attention; its o_proj refit so its stream after attention is the teacher's
            z = [_input_of(ls.self_attn.o_proj, ls.self_attn, hidden_states=ls.input_layernorm(h), **kw)
                 for h, kw in zip(hs, kws, strict=True)]
            if attn:
                _solve(torch, ls.self_attn.o_proj, [(x, m - h) for x, m, h in zip(z, mid_t, hs, strict=True)], ridge)
            mid_s = [h + ls.self_attn.o_proj(x) for h, x in zip(hs, z, strict=True)]
            # the student's FFN; its down_proj refit so its stream after the block is the teacher's
            a = [_input_of(ls.mlp.down_proj, ls.mlp, ls.post_attention_layernorm(m)) for m in mid_s]
            if ffn:
                _solve(torch, ls.mlp.down_proj, [(x, o - m) for x, o, m in zip(a, out_t, mid_s, strict=True)], ridge)
            hs = [m + ls.mlp.down_proj(x) for m, x in zip(mid_s, a, strict=True)]
            ht = out_t
    if progress:
        progress("healing: refitting blocks", n, n)
    return torch.cat(ht)


def _input_of(module: Any, run: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
    """What ``module`` receives (its first positional input) when ``run(*args, **kwargs)`` runs."""
    seen: list[Any] = []
    handle = module.register_forward_pre_hook(lambda _m, args: seen.append(args[0]))
    try:
        run(*args, **kwargs)
    finally:
        handle.remove()
    return seen[0]


def _solve(torch: Any, linear: Any, pairs: list[tuple[Any, Any]], ridge: float) -> None:
    """Set ``linear.weight`` to the ridge least-squares map from the inputs to the targets of ``pairs``."""
    n_in = linear.weight.shape[1]
    gram = torch.zeros(n_in, n_in, dtype=torch.float64)
    cross = torch.zeros(n_in, linear.weight.shape[0], dtype=torch.float64)
    for x, y in pairs:
        x2, y2 = x.reshape(-1, n_in), y.reshape(-1, y.shape[-1])
        if linear.bias is not None:
            y2 = y2 - linear.bias
        gram += (x2.T @ x2).double()
        cross += (x2.T @ y2).double()
    scale = float(gram.diagonal().mean()) or 1.0
    w = torch.linalg.solve(gram + ridge * scale * torch.eye(n_in, dtype=torch.float64), cross)
    linear.weight.copy_(w.T.to(linear.weight.dtype))


def narrowed_parts(spec: str) -> tuple[bool, bool] | None:
    """(heads removed, FFN neurons removed) by a ``width:`` pruning spec (already validated by
    ``WidthSpec.parse``); None for any other spec."""
    kind, _, rest = spec.partition(":")
    if kind != "width":
        return None
    keys = {part.strip().partition("=")[0] for part in rest.split(",")}
    return "heads" in keys, bool(keys & {"ffn", "auto"})
