"""The hot/cold sparse FFN: permutation, split, router, the Qwen2-MoE file in llama.cpp, and placement."""

from __future__ import annotations

import json

import numpy as np
import pytest

from edgekit.converters.sparse_ffn import kernels
from edgekit.converters.sparse_ffn.config import SparseFFNConfig
from edgekit.errors import InputError


def _ffn(rng, d=48, n=96):
    return (rng.standard_normal((n, d)) * 0.2, rng.standard_normal((n, d)) * 0.2, rng.standard_normal((d, n)) * 0.2)


def test_permutation_and_split_leave_the_ffn_unchanged():
    rng = np.random.default_rng(0)
    gate, up, down = _ffn(rng)
    x = rng.standard_normal((20, 48))
    ref = kernels.swiglu_ffn(x, gate, up, down)
    order = rng.permutation(96)
    np.testing.assert_allclose(kernels.swiglu_ffn(x, *kernels.permute_ffn(gate, up, down, order)), ref, atol=1e-12)
    # hot set + every cluster, as llama.cpp sums them, is the dense FFN
    hot, cold = order[:32], order[32:].reshape(4, 16)
    parts = kernels.swiglu_ffn(x, gate[hot], up[hot], down[:, hot])
    parts += sum(kernels.swiglu_ffn(x, gate[c], up[c], down[:, c]) for c in cold)
    np.testing.assert_allclose(parts, ref, atol=1e-12)
    # and a wrong permutation (rows of gate moved, down not) does change it: the check can fail
    bad = kernels.swiglu_ffn(x, gate[order], up[order], down)
    assert np.abs(bad - ref).max() > 1e-3


def test_balanced_clusters_group_coactive_neurons():
    rng = np.random.default_rng(1)
    tokens = rng.integers(0, 4, size=400)  # each token belongs to one of 4 "topics"
    profiles = np.zeros((32, 400))
    for n in range(32):  # neuron n fires on topic n % 4
        profiles[n] = (tokens == n % 4) * (1 + rng.random(400))
    clusters = kernels.balanced_clusters(profiles, 4)
    assert clusters.shape == (4, 8)
    assert sorted(clusters.ravel().tolist()) == list(range(32))
    for c in clusters:
        assert len({n % 4 for n in c}) == 1  # each cluster is one topic's neurons


def test_router_recall_on_a_constructed_case():
    rng = np.random.default_rng(2)
    d, E, k = 32, 8, 2
    W_true = rng.standard_normal((E, d))
    x = rng.standard_normal((3000, d)).astype(np.float32)
    scores = np.maximum(x @ W_true.T, 0) + 0.01 * rng.random((3000, E))  # linearly predictable cluster activity
    router = kernels.train_router(x[:2400], scores[:2400], k, steps=200)
    r = kernels.recall(x[2400:] @ router.T, scores[2400:], k)
    assert r > 0.9
    # labels that no linear map predicts (shuffled tokens) stay near chance (k/E = 0.25)
    shuffled = kernels.train_router(x[:2400], scores[rng.permutation(2400)], k, steps=200)
    assert kernels.recall(x[2400:] @ shuffled.T, scores[2400:], k) < 0.45


def test_output_error_tells_clustered_activity_from_scattered():
    """The split's FFN-output errors: when each token's active neurons are one cluster, a perfect router loses
    what skipping as many single neurons loses (nothing); when they scatter, the layout loses most of the
    output and the converter warns."""
    from edgekit.converters.formats.gguf.sparse import quality_note

    rng = np.random.default_rng(3)
    n_tok, n, d = 600, 32, 16
    down = rng.standard_normal((d, n))
    clusters, hot = np.arange(n).reshape(4, 8), np.array([], dtype=np.int64)
    clustered, scattered = np.zeros((n_tok, n)), np.zeros((n_tok, n))
    for t in range(n_tok):
        clustered[t, clusters[rng.integers(0, 4)]] = 1 + rng.random(8)
        scattered[t, rng.choice(n, 8, replace=False)] = 1 + rng.random(8)
    for acts, scatters in ((clustered, False), (scattered, True)):
        best = kernels.top_k_mask(kernels.cluster_scores(acts, down, clusters), 1)
        perfect = kernels.output_error(acts, down, kernels.cluster_mask(hot, clusters, best, n))
        top_k = kernels.output_error(acts, down, kernels.top_k_mask(kernels.contributions(acts, down), 8))
        assert top_k < 1e-12 and (perfect > 0.5) == scatters
        note = quality_note({"recall_mean": 1.0, "ffn_output_error": {"router": perfect, "perfect_router": perfect,
                                                                      "top_k": top_k}})
        assert note.startswith("warning: ") == scatters and "with a perfect router" in note


def test_power_law_fit_tells_a_power_law_from_a_flat_profile():
    ranks = np.arange(1, 1001)
    stats = kernels.NeuronStats(freq=0.9 * ranks ** -0.8, mean_abs=np.ones(1000), importance=np.ones(1000))
    fit = stats.power_law()
    assert fit["r2"] > 0.99 and abs(fit["slope"] + 0.8) < 1e-6
    flat = kernels.NeuronStats(freq=np.linspace(0.55, 0.45, 1000), mean_abs=np.ones(1000), importance=np.ones(1000))
    assert flat.power_law()["top20_share"] < 0.25 < fit["top20_share"]


def test_config_shapes_and_refusals():
    cfg = SparseFFNConfig(sparsity=0.5)
    assert cfg.shape(1536) == (512, 64, 4)  # SmolLM2: 512 hot, 16 clusters of 64, 4 run per token
    assert cfg.achieved(1536) == pytest.approx(0.5)
    with pytest.raises(InputError, match="power of two"):
        SparseFFNConfig(clusters=12)
    with pytest.raises(InputError, match=r"at most 0.67 .*use --sparse-ffn 0.66 or less"):
        SparseFFNConfig(sparsity=0.9).shape(1536)
    assert SparseFFNConfig(sparsity=0.66).shape(1536)[2] >= 1  # the value the refusal offers is taken
    # too many clusters for the width: the refusal names the most that fit, and that many do fit
    with pytest.raises(InputError, match="use -O sparse_clusters=8"):
        SparseFFNConfig(sparsity=0.25).shape(512)
    assert SparseFFNConfig(sparsity=0.25, clusters=8).shape(512) == (256, 32, 4)
    with pytest.raises(InputError, match="too narrow"):
        SparseFFNConfig(clusters=2).shape(64)
    # a share that skips nothing (0, or under half a cold cluster) is the dense model in a slower layout
    with pytest.raises(InputError, match="0 < S < 1"):
        SparseFFNConfig(sparsity=0.0)
    with pytest.raises(InputError, match=r"--sparse-ffn 0.01 skips no cold cluster.*use --sparse-ffn 0.05 or more"):
        SparseFFNConfig(sparsity=0.01).shape(1536)
    assert SparseFFNConfig(sparsity=0.05).shape(1536)[2] == 15  # the value the refusal offers skips one


@pytest.mark.llamacpp
def test_all_clusters_selected_equals_dense_in_llamacpp(tmp_path, tiny_llama, monkeypatch):
    from edgekit import api
    from edgekit.runtime.llamacpp import LlamaCppBackend

    recipe = api.ConvertRecipe(preset="F32")
    dense = api.convert(tiny_llama, "gguf", output=tmp_path / "dense", recipe=recipe)
    sparse = api.convert(tiny_llama, "gguf", output=tmp_path / "sparse", recipe=api.ConvertRecipe(
        preset="F32", calib=api.CalibConfig(samples=4, seqlen=64),
        extra={"sparse_ffn": "0.25", "sparse_clusters": "4"}))
    info = sparse.manifest["sparse_ffn"]
    assert (info["architecture"], info["hot"], info["clusters"], info["cluster_size"], info["used"]) == \
        ("qwen2moe", 256, 4, 64, 2)
    err = info["ffn_output_error"]  # and the converter says what the split costs the FFN's output
    assert set(err) == {"router", "perfect_router", "top_k"} and all(0 < v < 1.5 for v in err.values())
    assert any("with a perfect router" in note for note in sparse.notes)
    from typer.testing import CliRunner

    from edgekit.cli.main import app

    shown = CliRunner().invoke(app, ["inspect", str(sparse.path)])
    assert shown.exit_code == 0
    assert "256 hot neurons + 4 clusters of 64, 2 run per token" in " ".join(shown.stdout.split())
    tokens = list(range(3, 50))
    with LlamaCppBackend(dense.model_file, n_ctx=64, n_threads=1) as b:
        ref = b.logits(tokens)
    from edgekit.runtime.llamacpp_decoding import experts_options

    assert experts_options(sparse.path, "all") == {"kv_overrides": {"qwen2moe.expert_used_count": 4}}
    with LlamaCppBackend(sparse.model_file, n_ctx=64, n_threads=1, **experts_options(sparse.path, "all")) as b:
        full = b.logits(tokens)
    with LlamaCppBackend(sparse.model_file, n_ctx=64, n_threads=1) as b:
        routed = b.logits(tokens)
    with LlamaCppBackend(sparse.model_file, n_ctx=64, n_threads=1, experts="all") as b:  # as -O experts=all
        assert np.array_equal(b.logits(tokens), full)
    assert np.abs(full - ref).max() < 2e-3 * np.abs(ref).max()
    assert np.abs(routed - ref).max() > 1e-2 * np.abs(ref).max()  # 2 of 4 clusters: a different model

    # --experts: one file, the whole curve. 'all' is the dense model's perplexity; not recorded in the manifest.
    runner = CliRunner()
    ppl = {}
    for name, path, extra in (("dense", dense.path, []), ("all", sparse.path, ["--experts", "all"]),
                              ("1", sparse.path, ["--experts", "1"])):
        r = runner.invoke(app, ["eval", str(path), "--ctx", "64", "--chunks", "2", "-t", "1", "--json", *extra])
        assert r.exit_code == 0, r.output
        ppl[name] = json.loads(r.stdout)["ppl"]
    assert ppl["all"] == pytest.approx(ppl["dense"], rel=1e-3) and abs(ppl["1"] / ppl["dense"] - 1) > 1e-2
    assert len(api.Artifact.open(sparse.path).manifest.get("eval") or []) == 0
    r = runner.invoke(app, ["profile", str(sparse.path), str(dense.path), "--experts", "1,all", "--tests", "tg8",
                            "-r", "1", "-t", "1", "--no-warmup", "--no-history", "--json"])
    assert r.exit_code == 0, r.output
    rows = json.loads(r.stdout)["rows"]  # the dense file beside it: timed once, as the baseline
    assert [(row["artifact"]["name"], row["config"].get("n_expert_used")) for row in rows] == [
        ("sparse", 1), ("dense", None), ("sparse", 4)]
    reads = [row["roofline"]["bytes_per_token"] for row in rows if row["artifact"]["name"] == "sparse"]
    assert reads[1] > reads[0]  # the roofline counts the experts run, not the file's 2
    import edgekit.runtime.serve.app as serve_app

    seen = {}  # serve: the mixture-of-experts file runs --experts, the dense one beside it as it is
    monkeypatch.setattr(serve_app, "serve", lambda config, *a, **k: seen.update(
        {m: config.options_for(m).get("kv_overrides") for m in config.models}))
    r = runner.invoke(app, ["serve", str(sparse.path), str(dense.path), "--experts", "all", "--port", "0"])
    assert r.exit_code == 0, r.output
    assert seen == {"sparse": {"qwen2moe.expert_used_count": 4}, "dense": None}
    tps = {}
    for e in ("1", "all"):  # the planner counts the experts each token reads
        r = runner.invoke(app, ["plan", str(sparse.path), "--ctx", "256", "--cpu-bandwidth", "20", "--json",
                                "--experts", e])
        assert r.exit_code == 0, r.output
        tps[e] = json.loads(r.stdout)["predicted_tps"]
    assert tps["1"] > tps["all"]
    shown = runner.invoke(app, ["plan", str(sparse.path), "--ctx", "256", "--cpu-bandwidth", "20", "--experts", "all"])
    assert "--override-kv qwen2moe.expert_used_count=int:4" in shown.stdout and "--experts all" in shown.stdout
    for args, says in ((["run", str(sparse.path), "-p", "hi", "--experts", "5"], "1 to 4 (this file's experts)"),
                       (["plan", str(sparse.path), "--experts", "5"], "1 to 4 (this file's experts)"),
                       (["serve", str(sparse.path), "--experts", "5"], "1 to 4 (this file's experts)"),
                       (["serve", str(dense.path), "--experts", "2"], "has no experts"),
                       (["run", str(sparse.path), "-p", "hi", "--offload", "auto", "--experts", "5"], "1 to 4"),
                       (["run", str(sparse.path), "-p", "hi", "-O", "experts=5"], "1 to 4 (this file's experts)"),
                       (["chat", str(sparse.path), "--experts", "9"], "1 to 4 (this file's experts)"),
                       (["run", str(dense.path), "-p", "hi", "--experts", "2"], "has no experts"),
                       (["eval", str(tiny_llama), "--experts", "2"], "not a GGUF"),
                       (["profile", str(dense.path), "--experts", "2"], "has no experts"),
                       (["profile", str(dense.path), str(sparse.path), "--experts", "8"], "1 to 4"),
                       (["profile", str(sparse.path), "--experts", "0"], "counts and 'all'")):
        r = runner.invoke(app, args)
        assert r.exit_code == 2 and says in r.output and "Traceback" not in r.output, (args, r.output)


def test_planner_puts_cold_clusters_on_the_cpu_as_the_budget_dictates():
    from edgekit.runtime.memory import MemoryConfig, ModelShape, TensorInfo, estimate_memory
    from edgekit.runtime.plan import Bandwidths, Budget, plan_offload

    MB = 1 << 20
    tensors = [TensorInfo("token_embd.weight", "Q8_0", 10 * MB, 10 * MB, 1000, None),
               TensorInfo("output.weight", "Q8_0", 10 * MB, 10 * MB, 1000, None)]
    for i in range(8):
        tensors += [TensorInfo(f"blk.{i}.attn_q.weight", "Q4_0", 2 * MB, 2 * MB, 100, i),
                    TensorInfo(f"blk.{i}.ffn_up_shexp.weight", "Q4_0", 6 * MB, 6 * MB, 100, i),
                    TensorInfo(f"blk.{i}.ffn_up_exps.weight", "Q4_0", 24 * MB, 24 * MB, 100, i)]
    shape = ModelShape("qwen2moe", 8, 1024, 8, 8, 128, 128, 4096, 1000, 2048, tuple(tensors), n_expert=16,
                       n_expert_used=4)
    bws = Bandwidths(cpu_Bps=20e9, gpu_Bps=500e9)
    roomy = plan_offload(shape, Budget(64 << 30, 8 << 30), 512, bws)
    assert roomy.tensor_overrides == [] and roomy.n_gpu_layers == 9
    tight = plan_offload(shape, Budget(64 << 30, 160 * MB), 512, bws)  # hot parts fit, cold clusters do not
    assert tight.n_gpu_layers == 9 and any("exps" in p for p, _ in tight.tensor_overrides)
    cfg = MemoryConfig(n_ctx=512, n_gpu_layers=9, tensor_overrides=tuple(tuple(o) for o in tight.tensor_overrides))
    est = estimate_memory(shape, cfg)
    cold_cpu = sum(t.n_bytes for t in tensors if "exps" in t.name and any(
        __import__("re").search(p, t.name) for p, _ in tight.tensor_overrides))
    assert est.parts["weights_cpu"] >= cold_cpu + 10 * MB  # the cold clusters (and the embedding) on the CPU
    assert est.parts["weights_gpu"] >= 8 * (2 + 6) * MB  # every hot part on the GPU
    none = plan_offload(shape, Budget(64 << 30, 0), 512, bws)
    assert none.n_gpu_layers == 0


def test_cli_refuses_bad_sparse_ffn_and_vram_without_offload(tiny_llama, tmp_path):
    from typer.testing import CliRunner

    from edgekit.cli.main import app

    runner = CliRunner()
    r = runner.invoke(app, ["convert", str(tiny_llama), "--to", "onnx", "--sparse-ffn", "0.5", "-o", str(tmp_path / "x")])
    assert r.exit_code != 0 and "--sparse-ffn is not an option of --to onnx" in r.output
    r = runner.invoke(app, ["convert", str(tiny_llama), "--sparse-ffn", "1.5", "-o", str(tmp_path / "y")])
    assert r.exit_code != 0 and "0 < S < 1" in r.output and "Traceback" not in r.output
    assert not (tmp_path / "y").exists()
    r = runner.invoke(app, ["run", str(tmp_path / "none"), "-p", "hi", "--vram", "2GiB"])
    assert r.exit_code != 0 and "--vram is the budget of --offload auto" in r.output
