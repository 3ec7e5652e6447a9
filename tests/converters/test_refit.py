"""The closed-form first stage of healing: narrowed blocks' output projections refit to the teacher's stream."""

from __future__ import annotations

import copy
import dataclasses

import numpy as np
import pytest

from edgekit.calibration import CalibConfig
from edgekit.model import HFCheckpoint

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    from tests.helpers import build_tiny_model

    return build_tiny_model(tmp_path_factory.mktemp("refit") / "llama", "LlamaForCausalLM", hidden=64, ffn=128,
                            layers=3)


def _load(path):
    return transformers.AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32).eval()


def _kl(teacher, student, ids):
    from edgekit.converters.structure.heal import kl_loss

    with torch.no_grad():
        return float(kl_loss(torch, teacher(ids).logits, student(ids).logits))


def test_refit_recovers_the_projections_of_an_unpruned_student(tiny):
    """With nothing removed, the teacher's own o_proj and down_proj are the exact least-squares answer:
    a student whose projections were scrambled gets them back (inputs and targets must line up for this)."""
    from edgekit.converters.structure.refit import refit_narrowed

    teacher = _load(tiny)
    student = copy.deepcopy(teacher)
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for layer in student.model.layers:
            for lin in (layer.self_attn.o_proj, layer.mlp.down_proj):
                lin.weight.copy_(torch.randn(lin.weight.shape, generator=gen) * 0.05)
    ids = torch.randint(0, teacher.config.vocab_size, (8, 48), generator=gen)
    last = refit_narrowed(teacher, student, ids, attn=True, ffn=True, ridge=1e-9, batch=3)
    with torch.no_grad():  # what it returns is the teacher's last hidden state: its logits are the teacher's
        want = teacher(ids).logits
        assert torch.allclose(teacher.lm_head(teacher.model.norm(last)), want, atol=1e-4 * float(want.abs().max()))
    for lt, ls in zip(teacher.model.layers, student.model.layers, strict=True):
        for name in ("self_attn.o_proj", "mlp.down_proj"):
            want, got = lt.get_submodule(name).weight, ls.get_submodule(name).weight
            assert torch.linalg.norm(got - want) <= 1e-3 * torch.linalg.norm(want), name
    assert _kl(teacher, student, ids[:2]) < 1e-8


def test_refit_lowers_the_held_out_kl_of_a_width_pruned_student(tiny, tmp_path):
    from edgekit.converters import structure
    from edgekit.converters.structure.refit import refit_narrowed

    calib = CalibConfig(samples=8, seqlen=32)
    pruned, _ = structure.apply(HFCheckpoint.open(tiny), "width:ffn=64,heads=2", calib, tmp_path / "p")
    teacher, student = _load(tiny), _load(pruned)
    gen = torch.Generator().manual_seed(1)
    train = torch.randint(0, teacher.config.vocab_size, (24, 48), generator=gen)
    held = torch.randint(0, teacher.config.vocab_size, (4, 48), generator=gen)
    before = _kl(teacher, student, held)
    refit_narrowed(teacher, student, train, attn=True, ffn=True)
    after = _kl(teacher, student, held)
    assert after < 0.8 * before, (before, after)
    # each part alone helps too (the attention refit, then the FFN refit on the attention-refit stream)
    only_ffn = _load(pruned)
    refit_narrowed(teacher, only_ffn, train, attn=False, ffn=True)
    assert after < _kl(teacher, only_ffn, held) < before


def test_healing_reports_the_refit_stage_and_keeps_it_only_when_it_helps(tiny, tmp_path, monkeypatch):
    from safetensors.numpy import load_file

    from edgekit.converters import structure
    from edgekit.converters.structure import refit
    from edgekit.converters.structure.heal import HealConfig, heal

    text = tmp_path / "text.txt"  # varied text: a random tiny teacher's own generations repeat themselves
    rng = np.random.default_rng(0)
    words = ["".join(rng.choice(list("abcdefghijklmnopqrstuvwxyz"), size=rng.integers(2, 8))) for _ in range(400)]
    text.write_text(" ".join(rng.choice(words, size=6000)))
    calib = CalibConfig(source=str(text), samples=32, seqlen=48)
    src = HFCheckpoint.open(tiny)
    cfg = HealConfig(minutes=5, max_steps=3, lr=1e-3, batch=2, checkpoint_s=0)
    pruned, _ = structure.apply(src, "width:ffn=64", calib, tmp_path / "p")
    seen = []
    report = heal(src, pruned, "width:ffn=64", cfg, calib, lambda d, a, b: seen.append(d), state_root=tmp_path / "s")
    assert report["kl_refit"] < report["kl_before"] and report["refit_kept"] and report["steps"] == 3
    assert seen.index("healing: refitting block 1/3") < min(i for i, d in enumerate(seen) if d.startswith("healing: step"))
    off = heal(src, structure.apply(src, "width:ffn=64", calib, tmp_path / "q")[0], "width:ffn=64",
               HealConfig(minutes=5, max_steps=3, lr=1e-3, batch=2, checkpoint_s=0, refit_seqs=0), calib,
               state_root=tmp_path / "s")
    assert "kl_refit" not in off

    def scramble(teacher, student, ids, **_):
        with torch.no_grad():
            for layer in student.model.layers:
                layer.mlp.down_proj.weight.mul_(-3.0)

    monkeypatch.setattr(refit, "refit_narrowed", scramble)
    bad, _ = structure.apply(src, "width:ffn=64", calib, tmp_path / "b")
    before = load_file(str(bad / "model.safetensors"))
    report = heal(src, bad, "width:ffn=64", dataclasses.replace(cfg, max_steps=1, lr=1e-12), calib,
                  state_root=tmp_path / "s")
    assert report["kl_refit"] > report["kl_before"] and not report["refit_kept"]
    after = load_file(str(bad / "model.safetensors"))  # the pruned weights, not the scrambled ones
    assert all(np.allclose(after[k], before[k], atol=1e-6) for k in before if "down_proj" in k)
