"""edgekit neurons: neuron statistics and the quality table (TEAL, CATS, the top-k and clusters bounds) through
the PyTorch reference."""

from __future__ import annotations

import json

import numpy as np
import pytest
from typer.testing import CliRunner

from edgekit.cli.main import app


def test_neurons_reports_statistics_and_a_quality_cost_that_grows_with_sparsity(tiny_llama, tmp_path):
    r = CliRunner().invoke(app, ["neurons", str(tiny_llama), "--calib-samples", "4", "--calib-seqlen", "64",
                                 "--chunks", "2", "--sparsity", "0.25,0.6", "--clusters", "4",
                                 "-o", str(tmp_path / "n"), "-t", "1"])
    assert r.exit_code == 0, r.output
    rep = json.loads((tmp_path / "n" / "neurons.json").read_text())
    assert (tmp_path / "n" / "neurons.png").stat().st_size > 1000
    assert len(rep["layers"]) == 2 and all(0 <= layer["r2"] <= 1 for layer in rep["layers"])
    for method in ("teal", "cats", "topk"):
        rows = {q["sparsity"]: q for q in rep["quality"] if q["method"] == method}
        assert 0 < rows[0.25]["kl_mean"] < rows[0.6]["kl_mean"]  # more sparsity, further from the dense model
        assert rows[0.6]["top1_agreement"] < 1
    # FFN 512 with 4 clusters: 256 hot neurons + 4 x 64 cold; 25% is 2 clusters run, 60% is more than is cold
    assert rep["layout"] == {"clusters": 4, "hot_fraction": 0.3333, "neurons_per_cluster": 64}
    clusters = [q for q in rep["quality"] if q["method"] == "clusters"]
    assert [(q["sparsity"], q["clusters_run"]) for q in clusters] == [(0.25, 2)] and clusters[0]["kl_mean"] > 0
    assert "TEAL" in r.output and "CATS" in r.output and "clusters (bound) 2/4" in r.stdout


def test_neurons_without_room_for_the_clusters_still_measures_the_rest(tiny_llama, tmp_path):
    r = CliRunner().invoke(app, ["neurons", str(tiny_llama), "--calib-samples", "2", "--calib-seqlen", "32",
                                 "--chunks", "1", "--sparsity", "0.5", "-o", str(tmp_path / "n"), "-t", "1"])
    assert r.exit_code == 0, r.output
    rep = json.loads((tmp_path / "n" / "neurons.json").read_text())
    assert {q["method"] for q in rep["quality"]} == {"teal", "cats", "topk"}
    assert "16 cold clusters" in rep["layout"]["skipped"] and "no clusters rows" in r.stdout
    # the fix names neurons' own flag (it has no -O), and that flag then gives the clusters rows
    assert "use --clusters 8" in rep["layout"]["skipped"] and "sparse_clusters" not in r.stdout


def test_neurons_on_per_block_widths_skips_the_clusters_rows_with_the_reason(tiny_llama, tmp_path):
    import shutil

    folder = tmp_path / "widths"
    shutil.copytree(tiny_llama, folder)
    cfg = json.loads((folder / "config.json").read_text())
    cfg["edgekit_ffn_widths"] = [512, 512]  # as width:auto writes it (here every block keeps its width)
    (folder / "config.json").write_text(json.dumps(cfg))
    r = CliRunner().invoke(app, ["neurons", str(folder), "--calib-samples", "2", "--calib-seqlen", "32",
                                 "--chunks", "1", "--sparsity", "0.5", "--clusters", "4", "-o", str(tmp_path / "n"),
                                 "-t", "1"])
    assert r.exit_code == 0, r.output
    rep = json.loads((tmp_path / "n" / "neurons.json").read_text())
    assert {q["method"] for q in rep["quality"]} == {"teal", "cats", "topk"}
    assert "per-block widths" in rep["layout"]["skipped"]


def _silu(g: np.ndarray) -> np.ndarray:
    return g / (1 + np.exp(-g))


def test_the_bounds_skip_exactly_the_neurons_and_clusters_they_say(tiny_llama):
    """With nothing skipped both bounds are the dense model; otherwise each MLP computes what a plain loop over
    neurons and clusters computes: the top-k neurons by |a_n| * ||down[:, n]||, or the hot set plus the
    clusters whose output ||down[:, c] @ a_c|| is largest."""
    import torch

    from edgekit.runtime.activation_sparsity import _Sparsified
    from edgekit.runtime.torch_ref import TorchBackend

    be = TorchBackend(tiny_llama)
    rng = np.random.default_rng(0)
    perm = rng.permutation(512)
    hot, clusters = np.sort(perm[:256]), perm[256:].reshape(4, 64)
    model = _Sparsified(be, {0: {}, 1: {}}, {0: (hot, clusters), 1: (hot, clusters)})
    tokens = be.tokenize("the quick brown fox jumps over the lazy dog " * 4)
    dense = model.logits(tokens)
    for mode in (("topk", 0.0), ("clusters", 4)):
        model.mode = mode
        np.testing.assert_allclose(model.logits(tokens), dense, rtol=0, atol=1e-5)
    model.mode = None

    mlp = be.model.model.layers[1].mlp
    gate, up, down = (w.weight.detach().double().numpy() for w in (mlp.gate_proj, mlp.up_proj, mlp.down_proj))
    x = rng.standard_normal((3, 256))
    a = _silu(x @ gate.T) * (x @ up.T)
    for mode in (("topk", 0.5), ("clusters", 1)):
        model.mode = mode
        with torch.no_grad():
            got = mlp.forward(torch.as_tensor(x, dtype=torch.float32)).double().numpy()
        model.mode = None
        want = np.zeros_like(got)
        for t in range(3):
            if mode[0] == "topk":
                keep = np.argsort(-np.abs(a[t]) * np.linalg.norm(down, axis=0))[:256]
            else:
                best = max(range(4), key=lambda c: np.linalg.norm(down[:, clusters[c]] @ a[t, clusters[c]]))
                keep = np.concatenate([hot, clusters[best]])
            want[t] = down[:, keep] @ a[t, keep]
        np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("bad", ["3", "0"])
def test_neurons_refuses_a_cluster_count_the_converter_would_refuse(tiny_llama, tmp_path, bad):
    r = CliRunner().invoke(app, ["neurons", str(tiny_llama), "--clusters", bad, "-o", str(tmp_path / "n")])
    assert r.exit_code == 2 and "power of two" in r.output and "Traceback" not in r.output


def test_neurons_on_an_artifact_names_the_checkpoint_it_was_converted_from(tmp_path, monkeypatch):
    store = tmp_path / "lib"
    art = store / "tiny-coreml-fp16"
    art.mkdir(parents=True)
    (art / "edgekit.json").write_text(json.dumps({"schema": "edgekit.artifact/1", "format": "coreml",
                                                  "source": {"path": "/models/tiny"}, "files": {}}))
    monkeypatch.setenv("EDGEKIT_MODELS", str(store))
    for ref in ("tiny-coreml-fp16", str(art)):  # a library name and a path
        r = CliRunner().invoke(app, ["neurons", ref, "-o", str(tmp_path / "n")])
        assert r.exit_code == 2 and "Traceback" not in r.output and len(r.output.strip().splitlines()) == 1
        assert "is an edgekit artifact" in r.output and "not a Hugging Face checkpoint folder" in r.output
        assert "edgekit neurons /models/tiny" in r.output and "does not exist" not in r.output
    assert not (tmp_path / "n").exists()
