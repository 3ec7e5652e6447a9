"""Reshaping step: AWQ's per-channel scales and clipping (:mod:`edgekit.converters.quantize.awq`).

The scales are folded into the ops that produce each linear's input (norms, earlier linears), so the
float layer is unchanged; the inputs the later steps see are ``x / s``, so the Hessians are rescaled
to ``H / (s s^T)`` rather than captured again. The changed norms and biases are encoded here.
"""

from __future__ import annotations

from typing import Any

from edgekit.converters.quantize.awq import AWQConfig
from edgekit.converters.quantize.steps.base import LayerState, Step, register_step


@register_step("awq")
class AWQScale(Step):
    config_class = AWQConfig
    needs_samples = True
    report_key = "awq"

    def layer(self, st: LayerState) -> dict[str, Any]:
        from edgekit.converters.quantize import awq

        torch = st.torch
        samples = {n: torch.cat(v) for n, v in st.samples.items()}
        assert isinstance(self.config, AWQConfig)
        report = awq.awq_layer(st.layer, samples, st.qtype, self.config, st.ckpt.spec.gguf_arch)
        for name, s in report.input_scales.items():
            s = torch.as_tensor(s, dtype=torch.float64)
            st.H[name] = st.H[name] / torch.outer(s, s)
            if name in st.diag:
                st.diag[name] = st.diag[name] / (s * s)
        st.keep_small_tensors()
        return report.to_json()
