"""Unstructured and N:M pruning: masks hit the exact ratio or pattern, Wanda and SparseGPT beat
magnitude on the layer's output error, GPTQ keeps a pruning's zeros, and the pruned file holds them."""

from __future__ import annotations

import gguf
import numpy as np
import pytest

from edgekit.converters.quantize import gptq_kernel, prune
from edgekit.converters.quantize.prune import Sparsity
from edgekit.errors import InputError


def _layer(n_out=64, n_in=128, n_tok=2048, seed=0):
    """Weights and the Hessian of correlated inputs with a few loud channels (as LLM activations have);
    each call draws from its own seeded generator, so a test's data does not depend on which ran before."""
    rng = np.random.default_rng(seed)
    mix = rng.normal(size=(n_in, n_in)).astype(np.float32) / np.sqrt(n_in)
    X = rng.normal(size=(n_tok, n_in)).astype(np.float32) @ (np.eye(n_in, dtype=np.float32) + 0.5 * mix)
    X[:, :6] *= 8.0
    W = rng.normal(size=(n_out, n_in)).astype(np.float32)
    return W, (X.T.astype(np.float64) @ X.astype(np.float64))


PATTERNS = [Sparsity(ratio=0.5), Sparsity(ratio=0.3), Sparsity(n=2, m=4), Sparsity(n=4, m=8)]


@pytest.mark.parametrize("sp", PATTERNS, ids=str)
@pytest.mark.parametrize("method", ["magnitude", "wanda", "sparsegpt"])
def test_masks_hit_the_ratio_or_pattern_exactly(method, sp):
    W, H = _layer()
    if method == "magnitude":
        mask = prune.magnitude_mask(W, sp)
    elif method == "wanda":
        mask = prune.wanda_mask(W, H, sp)
    else:
        new, mask = prune.sparsegpt(W, H, sp)
        assert np.all(new[mask] == 0)
    if sp.m:
        per_group = mask.reshape(W.shape[0], -1, sp.m).sum(axis=2)
        assert np.all(per_group == sp.n)
    elif method == "sparsegpt":
        assert mask.mean() == pytest.approx(sp.ratio, abs=1 / W.size)
    else:
        assert np.all(mask.sum(axis=1) == round(sp.ratio * W.shape[1]))


def test_wanda_keeps_small_weights_on_loud_inputs():
    W = np.ones((4, 8), np.float32)
    W[:, 0] = 0.1  # small weights...
    H = np.eye(8) * 1.0
    H[0, 0] = 1e4  # ...on a loud channel: |w| * ||x|| = 10, above every other weight's 1
    mask = prune.wanda_mask(W, H, Sparsity(ratio=0.5))
    assert not mask[:, 0].any() and prune.magnitude_mask(W, Sparsity(ratio=0.5))[:, 0].all()


@pytest.mark.parametrize("sp", [Sparsity(ratio=0.5), Sparsity(n=2, m=4)], ids=str)
def test_sparsegpt_is_sequential_obs_and_beats_plain_masking(sp):
    """SparseGPT's update equals optimal brain surgeon done column by column with explicit inverses of
    the remaining columns' Hessian; it lowers the output error of its own mask; Wanda beats magnitude."""
    W, H = _layer(n_out=16, n_in=64, n_tok=512)
    damp = 0.01
    new, mask = prune.sparsegpt(W, H, sp, damp=damp, block_cols=64)
    Hd = H + damp * np.mean(np.diag(H)) * np.eye(H.shape[0])
    ref = W.astype(np.float64).copy()
    n = W.shape[1]
    for i in range(n):
        hinv = np.linalg.inv(Hd[i:, i:])
        e = np.where(mask[:, i], ref[:, i], 0.0) / hinv[0, 0]
        ref[:, i:] -= e[:, None] * hinv[0][None, :]
    ref[mask] = 0.0
    np.testing.assert_allclose(new, ref, rtol=0, atol=2e-4 * np.abs(W).max())
    err_masked = gptq_kernel.hessian_error(W, np.where(mask, 0, W), H)
    assert gptq_kernel.hessian_error(W, new, H) < 0.9 * err_masked
    wanda = gptq_kernel.hessian_error(W, np.where(prune.wanda_mask(W, H, sp), 0, W), H)
    magnitude = gptq_kernel.hessian_error(W, np.where(prune.magnitude_mask(W, sp), 0, W), H)
    assert wanda < 0.8 * magnitude


@pytest.mark.parametrize("qtype", ["Q8_0", "Q4_0", "Q4_K"])
def test_gptq_keeps_the_zeros_of_a_mask(qtype):
    W, H = _layer(n_in=256)
    new, mask = prune.sparsegpt(W, H, Sparsity(n=2, m=4))
    res = gptq_kernel.gptq(new, H, qtype, mask=mask)
    near0 = np.abs(res.weight[mask])
    if qtype in ("Q8_0", "Q4_0"):  # symmetric grids hold 0 exactly
        assert np.all(near0 == 0)
    else:  # Q4_K stores d*q - m: the nearest value to 0
        assert near0.mean() < 0.1 * np.abs(res.weight[~mask]).mean()
    # joint: better than rounding the pruned weights without compensating the pruned ones' drift
    plain = gptq_kernel.gptq(new, H, qtype)
    assert gptq_kernel.hessian_error(W, res.weight, H) < 1.5 * gptq_kernel.hessian_error(W, plain.weight, H)
    with pytest.raises(InputError, match="mask has shape"):
        gptq_kernel.gptq(new, H, qtype, mask=mask[:, :8])


def test_sparsity_parsing():
    assert Sparsity.parse("0.5") == Sparsity(ratio=0.5) and Sparsity.parse("50%") == Sparsity(ratio=0.5)
    assert Sparsity.parse("2:4") == Sparsity(n=2, m=4)
    for bad in ("1.5", "4:4", "x", "0"):
        with pytest.raises(InputError):
            Sparsity.parse(bad)


def test_pruned_gguf_holds_the_pattern(tiny_llama, tmp_path):
    """--prune sparsegpt:2:4 with GPTQ onto Q8_0: every pruned linear in the file has exactly 2 zeros
    in each group of 4 inputs, and the manifest records the recipe and the measured sparsity."""
    from typer.testing import CliRunner

    from edgekit.cli.main import app

    out = tmp_path / "p"
    r = CliRunner().invoke(app, ["convert", str(tiny_llama), "--type", "Q8_0", "--method", "gptq", "--prune",
                                 "sparsegpt:2:4", "--calib-samples", "4", "--calib-seqlen", "32", "-o", str(out)])
    assert r.exit_code == 0, r.output
    from edgekit.artifact import Artifact

    art = Artifact.open(out)
    steps = [s["step"] for s in art.manifest["recipe"]["quantizer"]["steps"]]
    assert steps == ["sparsegpt", "gptq"]
    for t in gguf.GGUFReader(art.model_file).tensors:
        if t.name.startswith("blk.") and t.name.endswith(".weight") and "norm" not in t.name:
            w = gguf.quants.dequantize(np.asarray(t.data), t.tensor_type)
            zeros = (w.reshape(w.shape[0], -1, 4) == 0).sum(axis=2)
            assert np.all(zeros >= 2), t.name
            assert (w == 0).mean() < 0.52, t.name
    r = CliRunner().invoke(app, ["convert", str(tiny_llama), "--prune", "lottery:0.5", "-o", str(tmp_path / "x")])
    assert r.exit_code != 0 and "wanda:S" in r.output and not (tmp_path / "x").exists()


def test_wanda_reads_plain_input_norms_not_the_sink_weighted_hessian():
    """The pipeline weights each sequence's first position in H (for rounding error); its plain per-column
    second moments ride along, and Wanda scores with those, as the paper does."""
    import torch

    from edgekit.converters.quantize.pipeline import _Stats
    from edgekit.converters.quantize.steps.prune import SparseGPTPrune, WandaPrune

    lin = torch.nn.Linear(4, 3, bias=False)
    x = torch.randn(2, 5, 4)
    x[:, 0] *= 30.0  # a loud first position, as the attention sink is
    stats = _Stats({"l": lin}, sink_weight=10.0, keep_samples=False)
    lin(x)
    stats.close()
    plain = (x.reshape(-1, 4) ** 2).sum(0).double()
    assert torch.allclose(stats.D["l"], plain)
    assert torch.allclose(torch.diag(stats.H["l"]), plain + 9 * (x[:, 0] ** 2).sum(0).double(), rtol=1e-5)
    assert WandaPrune.plain_norms and not SparseGPTPrune.plain_norms
    W, H = _layer(n_out=8, n_in=32, n_tok=64)  # the diagonal alone gives Wanda the same mask as the matrix
    assert np.array_equal(prune.wanda_mask(W, np.diag(H), Sparsity(n=2, m=4)),
                          prune.wanda_mask(W, H, Sparsity(n=2, m=4)))


@pytest.mark.parametrize("qtype, exact", [("Q8_0", True), ("Q4_K", False)])
def test_the_manifest_says_how_many_pruned_weights_the_file_stores_as_zeros(tiny_llama, tmp_path, qtype, exact):
    """A grid without a minimum (Q8_0) stores every pruned weight as 0; Q4_K's minimum stores most of them as
    the block's nearest value. The manifest's ``stored`` is what the file holds (counted here by decoding
    it), ``mean`` what was pruned; show says both when they differ."""
    from typer.testing import CliRunner

    from edgekit.artifact import Artifact
    from edgekit.cli.main import app

    out = tmp_path / "p"
    r = CliRunner().invoke(app, ["convert", str(tiny_llama), "--type", qtype, "--method", "gptq", "--prune",
                                 "wanda:0.5", "--calib-samples", "4", "--calib-seqlen", "32", "-o", str(out)])
    assert r.exit_code == 0, r.output
    sp = Artifact.open(out).manifest["sparsity"]
    zeros = total = 0
    for t in gguf.GGUFReader(out / "model.gguf").tensors:
        if t.name.startswith("blk.") and t.name.endswith(".weight") and "norm" not in t.name:
            w = gguf.quants.dequantize(np.asarray(t.data), t.tensor_type)
            zeros, total = zeros + int((w == 0).sum()), total + w.size
    assert sp["mean"] == pytest.approx(0.5, abs=0.01)
    assert sp["stored"] == pytest.approx(zeros / total, abs=0.002)
    assert (sp["stored"] == sp["mean"]) if exact else sp["stored"] < 0.5 * sp["mean"]
    shown = CliRunner().invoke(app, ["show", str(out)]).output
    assert ("stored as exact zeros" in shown) != exact, shown
