"""Zero-padding a checkpoint's hidden size leaves its logits unchanged (to float tolerance)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from edgekit.errors import InputError


def _tiny_llama(path: Path) -> None:
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    cfg = transformers.LlamaConfig(vocab_size=64, hidden_size=48, intermediate_size=96, num_hidden_layers=2,
                                   num_attention_heads=3, num_key_value_heads=1, head_dim=16, rms_norm_eps=1e-5,
                                   tie_word_embeddings=True, max_position_embeddings=64)
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(cfg)
    with torch.no_grad():  # non-trivial norms, so their rescaling is exercised
        for name, p in model.named_parameters():
            if "norm" in name:
                p.uniform_(0.5, 1.5)
    model.save_pretrained(path, safe_serialization=True)


def _logits(path: Path, ids) -> np.ndarray:
    import torch
    from transformers import AutoModelForCausalLM

    with torch.no_grad():
        return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)(ids).logits.numpy()


def test_padded_model_logits_equal_the_original(tmp_path: Path) -> None:
    import torch

    from edgekit.converters.structure.pad import pad_hidden
    from edgekit.model import HFCheckpoint

    _tiny_llama(tmp_path / "src")
    out = pad_hidden(HFCheckpoint.open(tmp_path / "src"), 96, tmp_path / "wide")
    cfg = json.loads((out / "config.json").read_text())
    assert (cfg["hidden_size"], cfg["num_attention_heads"], cfg["num_key_value_heads"]) == (96, 6, 2)
    ids = torch.tensor([[1, 5, 9, 33, 2, 61, 17, 40, 8, 3, 12, 50]])
    a, b = _logits(tmp_path / "src", ids), _logits(out, ids)
    assert np.abs(a - b).max() < 1e-4 * np.abs(a).max()
    assert np.array_equal(a.argmax(-1), b.argmax(-1))
    with pytest.raises(InputError, match="head_dim"):
        pad_hidden(HFCheckpoint.open(tmp_path / "src"), 80, tmp_path / "bad")
