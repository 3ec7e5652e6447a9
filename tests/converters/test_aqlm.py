"""AQLM: the encoder against its objective, the checkpoint against the aqlm package's own decode and
layers (transformers loads it), edgekit's runtime kernels against the decoded weights, the CLI, bad input."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from edgekit.cli.main import app
from edgekit.converters.formats.aqlm.format import scheme_for_budget
from edgekit.converters.formats.aqlm.layout import pack_codes, unpack_codes
from edgekit.converters.quantize.aqlm_kernel import AQLMScheme, decode, encode, hessian_error, parse_scheme
from edgekit.errors import InputError

runner = CliRunner()
torch = pytest.importorskip("torch")


def _layer(seed: int = 0, out: int = 48, inp: int = 64) -> tuple[np.ndarray, np.ndarray]:
    """A weight matrix and the Hessian proxy of correlated inputs with uneven column scales (as real
    activations have): the case where weighting by H matters."""
    rng = np.random.default_rng(seed)
    W = (rng.standard_normal((out, inp)) * 0.05).astype(np.float32)
    mix = np.eye(inp) + 0.5 * rng.standard_normal((inp, inp)) / np.sqrt(inp)
    X = rng.standard_normal((2048, inp)) @ mix * np.exp(rng.standard_normal(inp))[None]
    return W, X.T @ X


# ---------------------------------------------------------------------------------------------- encoder


def test_scheme_parsing_and_sizes():
    s = parse_scheme("2x8")
    assert (s.num_codebooks, s.nbits, s.in_group, s.code_bits_per_weight) == (2, 8, 8, 2.0)
    # codes int8 (out * in/8 * 2) + fp16 codebooks (2 * 256 * 8) + fp16 scales (out)
    assert s.nbytes(64, 128) == 64 * 16 * 2 + 2 * (2 * 256 * 8 + 64)
    assert parse_scheme("1x16").nbytes(8, 8) == 8 * 1 * 2 + 2 * (65536 * 8 + 8)
    for bad in ("2x", "x8", "9x8", "2x17"):
        with pytest.raises(InputError):
            parse_scheme(bad)


def test_encoding_lowers_the_objective_and_uses_the_hessian():
    W, H = _layer()
    scheme = AQLMScheme(2, 6, 8)
    enc = encode(W, H, scheme, rounds=2, beam=2, seed=0)
    assert enc.codes.shape == (48, 8, 2) and enc.codes.max() < 64 and enc.codebooks.shape == (2, 64, 8)
    assert np.array_equal(enc.weight(), decode(enc.codes, enc.codebooks, enc.scales))
    # every phase after the k-means start lowers the objective (the best state is returned)
    assert enc.history[-1] < 0.8 * enc.history[0]
    assert enc.rel_error == pytest.approx(min(enc.history), rel=1e-6)
    # against the true H, the H-aware encoding beats the same encoder told every column matters alike
    blind = encode(W, np.eye(W.shape[1]), scheme, rounds=2, beam=2, seed=0)
    assert hessian_error(W, enc.weight(), H) < 0.7 * hessian_error(W, blind.weight(), H)


def test_one_large_codebook():
    """The 1xB schemes (1x16 in AQLM's papers; 1x9 here, to stay quick): one codebook, int16 codes."""
    W, H = _layer(2, out=256)
    enc = encode(W, H, AQLMScheme(1, 9, 8), rounds=1, beam=1)
    assert enc.codes.shape == (256, 8, 1) and enc.codebooks.shape == (1, 512, 8) and enc.history[-1] < enc.history[0]
    packed = pack_codes(enc.codes, 9)
    assert packed.dtype == np.int16 and np.array_equal(unpack_codes(packed, 9), enc.codes)


def test_beam_search_does_not_lose_to_greedy():
    W, H = _layer(1)
    greedy = encode(W, H, AQLMScheme(2, 5, 8), rounds=1, beam=1, seed=0)
    beam = encode(W, H, AQLMScheme(2, 5, 8), rounds=1, beam=8, seed=0)
    assert hessian_error(W, beam.weight(), H) <= 1.02 * hessian_error(W, greedy.weight(), H)


def test_codes_pack_as_the_aqlm_package_does():
    codes = np.arange(256).reshape(4, 32, 2) % 256
    packed = pack_codes(codes, 8)
    assert packed.dtype == np.int8 and np.array_equal(unpack_codes(packed, 8), codes)
    wide = np.array([0, 1, 32767, 32768, 65535]).reshape(1, 5, 1)
    assert pack_codes(wide, 16).dtype == np.int16 and np.array_equal(unpack_codes(pack_codes(wide, 16), 16), wide)
    aqlm_utils = pytest.importorskip("aqlm.utils")
    assert np.array_equal(aqlm_utils.pack_int_data(torch.from_numpy(codes.copy()), 8).numpy(), packed)


def test_decode_matches_the_aqlm_package():
    aqlm_utils = pytest.importorskip("aqlm.utils")
    rng = np.random.default_rng(3)
    codes = rng.integers(0, 256, (16, 4, 2))
    books = rng.standard_normal((2, 256, 8)).astype(np.float32)
    scales = rng.random(16).astype(np.float32)
    theirs = aqlm_utils._dequantize_weight(torch.from_numpy(codes), torch.from_numpy(books[:, :, None, :]),
                                           torch.from_numpy(scales.reshape(-1, 1, 1, 1))).numpy()
    np.testing.assert_allclose(decode(codes, books, scales), theirs, rtol=1e-6, atol=1e-6)


# ---------------------------------------------------------------------------------------------- checkpoint


def _convert_tiny(src: Path, out: Path, home: Path, distill: bool = True, **options: str):
    """The tiny Llama as AQLM 2x6 (64-entry codebooks keep the test quick), one round, then (``distill``)
    12 steps of fine-tuning; edgekit's caches in ``home``; ``options``: more ``-O`` options."""
    import os

    from edgekit import api
    from edgekit.calibration import CalibConfig
    from edgekit.converters.quantize.aqlm import AQLMConfig
    from edgekit.converters.structure.heal import HealConfig

    old = os.environ.get("EDGEKIT_HOME")
    os.environ["EDGEKIT_HOME"] = str(home)
    try:
        tune = HealConfig(minutes=5, max_steps=12, lr=1e-3, batch=2) if distill else None
        return api.convert(src, "aqlm", output=out, recipe=api.ConvertRecipe(bits=2, extra={"scheme": "2x6", **options}),
                           quantize=AQLMConfig(rounds=1, beam=2, cg_iters=10, distill=tune,
                                               calib=CalibConfig(samples=6, seqlen=64)), force=True)
    finally:
        if old is None:
            os.environ.pop("EDGEKIT_HOME", None)
        else:
            os.environ["EDGEKIT_HOME"] = old


@pytest.fixture(scope="module")
def aqlm_home(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("home")


@pytest.fixture(scope="module")
def aqlm_art(tiny_llama, tmp_path_factory, aqlm_home):
    return _convert_tiny(tiny_llama, tmp_path_factory.mktemp("aqlm") / "tiny-aqlm", aqlm_home)


def test_a_second_conversion_reuses_the_encoding(aqlm_art, tiny_llama, aqlm_home, tmp_path):
    """The layer-wise encoding is cached (same weights, plan, settings, calibration): converting again,
    here without the fine-tuning, takes it from there and writes the encoding as it was before tuning."""
    import time

    t0 = time.perf_counter()
    again = _convert_tiny(tiny_llama, tmp_path / "again", aqlm_home, distill=False)
    assert time.perf_counter() - t0 < aqlm_art.manifest["aqlm"]["build_s"] / 2
    assert len(list((aqlm_home / "aqlm").iterdir())) == 1
    from safetensors.numpy import load_file

    a, b = load_file(str(aqlm_art.path / "model.safetensors")), load_file(str(again.path / "model.safetensors"))
    name = "model.layers.1.self_attn.o_proj"
    assert np.array_equal(a[f"{name}.codes"], b[f"{name}.codes"])  # the codes stay what the encoding chose
    assert not np.array_equal(a[f"{name}.codebooks"], b[f"{name}.codebooks"])  # only tuning moved the books


def test_the_finished_fine_tuning_keeps_only_what_it_trained(aqlm_art, aqlm_home):
    """The student's float weights are frozen (its codes select from the codebooks) and the embedding and head
    too: a finished fine-tuning's state holds the codebooks, scales and norms it trained, and no optimizer
    moments (only a resume needs them); reused as is, it is a few hundred KB, not the whole model twice."""
    from safetensors import safe_open

    assert aqlm_art.manifest["aqlm"]["distill"]["steps"] == 12
    states = list((aqlm_home / "heal").iterdir())
    assert states
    for state in states:
        assert sorted(p.name for p in state.iterdir()) == ["state.json", "student.safetensors"]
        with safe_open(str(state / "student.safetensors"), framework="numpy") as f:
            keys = set(f.keys())
        assert sum(k.endswith(".aqlm_codebooks") for k in keys) == 14 == sum(k.endswith(".aqlm_scales") for k in keys)
        assert all(k.endswith((".aqlm_codebooks", ".aqlm_scales", "norm.weight")) for k in keys), sorted(keys)


def _decoded_model(src: Path, art_path: Path):
    import transformers

    from edgekit.converters.formats.aqlm.read import decoded_weights

    model = transformers.AutoModelForCausalLM.from_config(transformers.AutoConfig.from_pretrained(str(src)),
                                                          dtype=torch.float32)
    missing, unexpected = model.load_state_dict({k: torch.from_numpy(v) for k, v in decoded_weights(art_path).items()},
                                                strict=False)
    assert not unexpected and set(missing) <= {"lm_head.weight"}
    model.tie_weights()
    return model.eval()


def test_checkpoint_layout_and_manifest(aqlm_art, tiny_llama):
    cfg = json.loads((aqlm_art.path / "config.json").read_text())
    q = cfg["quantization_config"]
    assert q == {"quant_method": "aqlm", "in_group_size": 8, "out_group_size": 1, "num_codebooks": 2,
                 "nbits_per_codebook": 6, "linear_weights_not_to_quantize": ["model.embed_tokens.weight",
                                                                              "lm_head.weight", "lm_head"]}
    from safetensors import safe_open

    with safe_open(aqlm_art.path / "model.safetensors", framework="np") as f:
        keys = set(f.keys())
        codes = f.get_tensor("model.layers.0.mlp.down_proj.codes")
        books = f.get_tensor("model.layers.0.mlp.down_proj.codebooks")
        scales = f.get_tensor("model.layers.0.mlp.down_proj.scales")
    assert codes.dtype == np.int8 and codes.shape == (256, 512 // 8, 2)
    assert books.dtype == np.float16 and books.shape == (2, 64, 1, 8) and scales.shape == (256, 1, 1, 1)
    assert "model.layers.0.mlp.down_proj.weight" not in keys
    assert ("lm_head.weight" in keys) == (not cfg.get("tie_word_embeddings", False))  # an untied head in fp16
    m = aqlm_art.manifest
    assert m["format"] == "aqlm" and m["preset"] == "AQLM_2x6" and m["aqlm"]["layer_s"]
    tuned = m["aqlm"]["distill"]  # the fine-tuning of codebooks, scales and norms lowered the held-out KL
    assert tuned["steps"] == 12 and tuned["kl_after"] < tuned["kl_before"]
    assert m["size_bytes"] == sum(t["bytes"] for t in m["tensors"].values())
    assert (aqlm_art.path / "tokenizer.json").exists()


def test_transformers_runs_it_and_equals_edgekits_decode(aqlm_art, tiny_llama):
    """The checkpoint loads in transformers with the aqlm package; edgekit's kernels (look-up tables for a
    few tokens, decoded weights for more) give the logits of a plain model holding edgekit's own decode of
    the codes (the fine-tuned codebooks and norms included), and so does the package's own layer (its
    decode kernel: 6-bit codebooks)."""
    pytest.importorskip("aqlm")
    from edgekit.runtime.aqlm import AQLMBackend

    ids = list(range(3, 40))
    ref = _decoded_model(tiny_llama, aqlm_art.path)
    with torch.no_grad():
        want = ref(torch.tensor([ids])).logits[0].numpy()
    for kernel in ("edgekit", "aqlm"):
        with AQLMBackend(aqlm_art.path, kernel=kernel) as b:
            assert b.n_quantized == 14
            np.testing.assert_allclose(b.logits(ids), want, atol=2e-4)  # prompt: decoded weights
            np.testing.assert_allclose(b.logits(ids[:1])[0], want[0], atol=2e-4)  # one token: look-up tables
    # the model the quantizer left behind is what the file decodes to: its float error is the encoder's
    with AQLMBackend(aqlm_art.path) as b:
        b.reset()
        b.decode(ids[:5])
        b.decode(ids[5:6])
        with pytest.raises(InputError):
            b.decode(list(range(b.n_ctx)))


def test_fp8_embedding_halves_its_bytes_and_transformers_loads_it(aqlm_art, tiny_llama, aqlm_home, tmp_path):
    """``-O embedding=fp8``: the embedding and the untied head are stored as float8 e4m3, the checkpoint's own
    values rounded once (as torch rounds), and the encoding and fine-tuning computed with those values;
    transformers casts them back exactly, so the AQLM layers' logits equal a plain model holding edgekit's
    decode; the file is smaller by one byte per value; the manifest says so."""
    pytest.importorskip("aqlm")
    from safetensors import safe_open

    from edgekit.model import HFCheckpoint
    from edgekit.runtime.aqlm import AQLMBackend

    art = _convert_tiny(tiny_llama, tmp_path / "fp8", aqlm_home, embedding="fp8")
    assert len(list((aqlm_home / "aqlm").iterdir())) == 2  # its own encoding: its layers saw other inputs
    ckpt = HFCheckpoint.open(tiny_llama)
    m, p = art.manifest, aqlm_art.manifest
    floats = [n for n, t in m["tensors"].items() if t["type"] == "F8_E4M3"]
    assert sorted(floats) == ["lm_head.weight", "model.embed_tokens.weight"]  # the tiny Llama's head is untied
    with safe_open(art.path / "model.safetensors", framework="pt") as f:
        for name in floats:
            stored = f.get_tensor(name)
            source = torch.from_numpy(ckpt.load(name).astype(np.float32))
            assert stored.dtype == torch.float8_e4m3fn
            assert torch.equal(stored.float(), source.to(torch.float8_e4m3fn).float())  # fine-tuning froze it
    assert m["aqlm"]["embedding"] == "fp8" and p["aqlm"]["embedding"] == "f16"
    assert sorted(m["aqlm"]["fp8_rel_error"]) == floats and all(0 < e < 0.05 for e in m["aqlm"]["fp8_rel_error"].values())
    assert m["aqlm"]["distill"]["kl_after"] < m["aqlm"]["distill"]["kl_before"]
    assert p["size_bytes"] - m["size_bytes"] == sum(np.prod(m["tensors"][n]["shape"]) for n in floats)
    assert m["size_bytes"] == sum(t["bytes"] for t in m["tensors"].values())
    ids = list(range(3, 40))
    with torch.no_grad():
        want = _decoded_model(tiny_llama, art.path)(torch.tensor([ids])).logits[0].numpy()
    with AQLMBackend(art.path) as b:
        assert b.model.get_input_embeddings().weight.dtype == torch.float32
        np.testing.assert_allclose(b.logits(ids), want, atol=2e-4)
    # the memory model: loaded, an fp8 embedding is as large as an fp16 one (float32 either way)
    loaded = [AQLMBackend.memory_estimate(a.path / "model.safetensors", 64).parts["weights"] for a in (art, aqlm_art)]
    assert loaded[0] == loaded[1]
    r = runner.invoke(app, ["inspect", str(art.path), "--json"])
    assert r.exit_code == 0, r.output
    info = json.loads(r.stdout)
    assert info["type_counts"]["F8_E4M3"] == 2 and info["file_bytes"] == m["size_bytes"]
    assert info["memory"]["weights"] == loaded[0] > m["size_bytes"]  # inspect's memory is the backend's


def test_the_pipeline_computes_with_the_stored_fp8_values(tiny_llama):
    """A plan that stores the embedding (and an untied head) in fp8 gives the calibration model those values; a
    tied head is the embedding's own parameter."""
    import transformers

    from edgekit.converters.quantize.pipeline import round_stored_floats
    from edgekit.converters.quantize.steps.base import F8_E4M3

    model = transformers.AutoModelForCausalLM.from_pretrained(str(tiny_llama), dtype=torch.float32)
    emb, head = model.get_input_embeddings().weight, model.get_output_embeddings().weight
    e0, h0 = emb.detach().clone(), head.detach().clone()
    round_stored_floats(torch, model, {"token_embd.weight": F8_E4M3})
    assert torch.equal(emb, e0.to(torch.float8_e4m3fn).float()) and torch.equal(head, h0)
    round_stored_floats(torch, model, {"output.weight": F8_E4M3})
    assert torch.equal(head, h0.to(torch.float8_e4m3fn).float()) and not torch.equal(head, h0)


def test_edgekit_kernels_against_aqlm_numba_kernel_on_one_thread():
    """With 8-bit codebooks the package's CPU kernel is numba; on one thread (its parallel loop races,
    Vahe1994/AQLM#86) it agrees with edgekit's look-up-table kernel."""
    pytest.importorskip("numba")
    aqlm = pytest.importorskip("aqlm")
    import numba

    from edgekit.runtime.aqlm import _edgekit_ops, dequantize, unblock_codes

    rng = np.random.default_rng(5)
    mod = aqlm.QuantizedLinear(64, 32, 8, 1, 2, 8, bias=False)
    mod.codes.data = torch.from_numpy(pack_codes(rng.integers(0, 256, (32, 8, 2)), 8))
    mod.codebooks.data = torch.from_numpy(rng.standard_normal((2, 256, 1, 8)).astype(np.float32))
    mod.scales.data = torch.from_numpy(rng.random((32, 1, 1, 1)).astype(np.float32))
    ours = aqlm.QuantizedLinear(64, 32, 8, 1, 2, 8, bias=False)
    ours.load_state_dict(mod.state_dict())
    _edgekit_ops(torch, ours)
    x = torch.from_numpy(rng.standard_normal((2, 64)).astype(np.float32))
    threads = numba.get_num_threads()
    numba.set_num_threads(1)
    try:
        with torch.no_grad():
            theirs, mine = mod(x), ours(x)
    finally:
        numba.set_num_threads(threads)
    codes = torch.from_numpy(unblock_codes(ours.codes.numpy(), 32)).long()  # the layer keeps them blocked
    W = dequantize(torch, codes, ours.codebooks[:, :, 0, :], ours.scales.reshape(-1))
    np.testing.assert_allclose(mine.numpy(), (x @ W.T).numpy(), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(theirs.numpy(), mine.numpy(), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("nbits, dtype, M", [(8, np.int8, 2), (12, np.int16, 2), (8, np.int8, 3)])
def test_the_blocked_gather_is_the_row_by_row_sum(nbits, dtype, M):
    """The compiled kernel sums blocks of rows group by group (for cache locality): each row's floats in the
    same order as a plain loop over its groups and codebooks, bit for bit, rows past the last full block and
    stored codes of K/2 or more (negative as stored) included."""
    pytest.importorskip("numba")
    from edgekit.runtime.aqlm import ROW_BLOCK, block_codes, numba_gather, unblock_codes

    rng = np.random.default_rng(7)
    K, n_rows, G = 1 << nbits, 2 * ROW_BLOCK + 22, 9
    codes = rng.integers(0, K, (n_rows, G, M))
    stored = np.where(codes >= K // 2, codes - K, codes).astype(dtype)  # as checkpoints store them
    lut = rng.standard_normal((2, G, M, K)).astype(np.float32)
    scales = rng.random(n_rows).astype(np.float32)
    blocked = block_codes(stored, K)
    assert np.array_equal(unblock_codes(blocked, n_rows), codes)
    out = np.empty((2, n_rows), np.float32)
    numba_gather()(lut, blocked, scales, out)
    want = np.empty_like(out)
    for t in range(2):
        for i in range(n_rows):
            acc = np.float32(0)
            for j in range(G):
                for m in range(M):
                    acc = np.float32(acc + lut[t, j, m, codes[i, j, m]])
            want[t, i] = acc * scales[i]
    assert np.array_equal(out, want)


def test_cli_inspect_run_eval_profile(aqlm_art, tmp_path):
    pytest.importorskip("aqlm")
    r = runner.invoke(app, ["inspect", str(aqlm_art.path), "--json"])
    assert r.exit_code == 0, r.output
    info = json.loads(r.stdout)
    assert info["format"] == "aqlm" and info["type_counts"]["AQLM_2x6"] == 14
    assert info["aqlm"]["num_codebooks"] == 2 and 2.0 < info["bpw"] < 16
    r = runner.invoke(app, ["run", str(aqlm_art.path), "-p", "hello", "--max-tokens", "4", "--temperature", "0"])
    assert r.exit_code == 0, r.output
    text = tmp_path / "t.txt"
    text.write_text("the quick brown fox jumps over the lazy dog. " * 60)
    r = runner.invoke(app, ["eval", str(aqlm_art.path), "--text", str(text), "--ctx", "64", "--chunks", "2"])
    assert r.exit_code == 0, r.output
    assert "ppl" in r.output.lower() or "perplexity" in r.output.lower()
    r = runner.invoke(app, ["profile", str(aqlm_art.path), "--tests", "pp16,tg4", "--reps", "1", "--json"])
    assert r.exit_code == 0, r.output
    rows = json.loads(r.stdout)["rows"]
    assert {row["test"] for row in rows} == {"pp16", "tg4"}, r.stdout
    assert all(row["status"] == "ok" and row["samples_s"] and row["backend"] == "aqlm" for row in rows), r.stdout


def test_size_budget_picks_the_codebook_count(tiny_llama):
    from edgekit.converters.formats.aqlm.format import checkpoint_bytes
    from edgekit.model import HFCheckpoint

    ckpt = HFCheckpoint.open(tiny_llama)
    three = checkpoint_bytes(ckpt, AQLMScheme(3, 8, 8))
    assert scheme_for_budget(ckpt, three, 8).num_codebooks == 3
    assert scheme_for_budget(ckpt, three - 1, 8).num_codebooks == 2
    with pytest.raises(InputError, match="at least"):
        scheme_for_budget(ckpt, 1000, 8)
    # an fp8 embedding frees one byte per embedding value for codebooks
    n_emb = sum(ckpt.tensors[n].numel for n in ("model.embed_tokens.weight", "lm_head.weight"))  # untied
    assert checkpoint_bytes(ckpt, AQLMScheme(3, 8, 8), "fp8") == three - n_emb
    four = checkpoint_bytes(ckpt, AQLMScheme(4, 8, 8), "fp8")
    assert scheme_for_budget(ckpt, four, 8, "fp8").num_codebooks == 4 and scheme_for_budget(ckpt, four, 8).num_codebooks < 4


def _one_line(output: str) -> bool:
    lines = [ln for ln in output.strip().splitlines() if not ln.startswith("warning:")]
    return len(lines) == 1 and lines[0].startswith("error:")


@pytest.mark.parametrize("args", [["--method", "gptq"], ["--type", "Q4_K_M"], ["-O", "scheme=2x99"],
                                  ["-O", "colour=red"], ["--bits", "5"], ["-O", "embedding=int4"]])
def test_bad_requests_get_one_line(tiny_llama, tmp_path, args):
    out = tmp_path / "x"
    r = runner.invoke(app, ["convert", str(tiny_llama), "--to", "aqlm", "-o", str(out), *args])
    assert r.exit_code != 0 and _one_line(r.output), r.output
    assert not out.exists()
