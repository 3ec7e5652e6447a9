"""Builders for tiny, random but real checkpoints (config, safetensors, tokenizer files)."""

from __future__ import annotations

import json
from pathlib import Path

CHATML = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]


def _training_text() -> list[str]:
    from edgekit.quickstart import sample_text_path

    return [line for line in sample_text_path().read_text().splitlines() if line.strip()]


def _bpe_tokenizer(folder: Path, vocab_size: int) -> int:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIALS,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(_training_text(), trainer)
    tok.save(str(folder / "tokenizer.json"))
    (folder / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "PreTrainedTokenizerFast", "bos_token": None, "eos_token": "<|im_end|>",
        "unk_token": "<|endoftext|>", "pad_token": "<|endoftext|>", "add_bos_token": False,
        "chat_template": CHATML, "model_max_length": 2048,
    }))
    return tok.get_vocab_size()


def _spm_tokenizer(folder: Path, vocab_size: int) -> int:
    import io

    import sentencepiece as spm

    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(_training_text()), model_writer=model, vocab_size=vocab_size, model_type="bpe",
        byte_fallback=True, character_coverage=1.0, user_defined_symbols=["<|im_start|>", "<|im_end|>"],
        minloglevel=2,
    )
    (folder / "tokenizer.model").write_bytes(model.getvalue())
    (folder / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "LlamaTokenizer", "bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>",
        "add_bos_token": True, "add_eos_token": False, "chat_template": CHATML,
    }))
    return vocab_size


def build_tiny_model(folder: Path, arch: str, *, hidden: int = 256, ffn: int = 512, layers: int = 2,
                     heads: int = 4, kv_heads: int = 2, tokenizer: str = "bpe", vocab_size: int = 384,
                     tie: bool = False, seed: int = 0, head_dim: int | None = None) -> Path:
    """Write a random ``arch`` checkpoint with a trained tokenizer into ``folder`` (``head_dim``: heads wider or
    narrower than ``hidden / heads``, as Qwen3's are). Qwen3's per-head q/k norm weights are random too (their
    default, all ones, would hide a norm applied to the wrong axis or left out)."""
    import torch
    import transformers

    folder.mkdir(parents=True, exist_ok=True)
    n_vocab = (_spm_tokenizer if tokenizer == "spm" else _bpe_tokenizer)(folder, vocab_size)
    config_cls = getattr(transformers, arch.replace("ForCausalLM", "Config"))
    cfg = config_cls(
        vocab_size=n_vocab, hidden_size=hidden, intermediate_size=ffn, num_hidden_layers=layers,
        num_attention_heads=heads, num_key_value_heads=kv_heads, max_position_embeddings=1024,
        rms_norm_eps=1e-5, tie_word_embeddings=tie, bos_token_id=1, eos_token_id=2,
        **({"head_dim": head_dim} if head_dim else {}),
    )
    torch.manual_seed(seed)
    model = getattr(transformers, arch)(cfg).eval()
    with torch.no_grad():  # larger than default init so that quantization error is visible in outputs
        for p in model.parameters():
            if p.ndim == 2:
                p.normal_(0, 0.08)
        for name, p in model.named_parameters():
            if name.endswith(("q_norm.weight", "k_norm.weight")):
                p.uniform_(0.5, 1.5)
    model.save_pretrained(folder, safe_serialization=True)
    return folder


def assert_gguf_holds_model(src: Path, gguf_path: Path, model) -> None:
    """Every tensor of the GGUF decodes exactly to the weights the PyTorch ``model`` carries (in
    llama.cpp's row order): what a calibrated method chose is what the file stores."""
    import gguf
    import numpy as np

    from edgekit.converters.formats.gguf import to_gguf_layout
    from edgekit.model import HFCheckpoint

    ckpt = HFCheckpoint.open(src)
    by_name = {t.name: t for t in gguf.GGUFReader(gguf_path).tensors}
    params = dict(model.named_parameters())
    for hf_name in ckpt.tensors:
        name = ckpt.spec.gguf_name(hf_name)
        if name is None or hf_name not in params:
            continue
        t = by_name[name]
        got = gguf.quants.dequantize(np.asarray(t.data), t.tensor_type)
        expected = to_gguf_layout(ckpt, name, params[hf_name].detach().numpy())
        np.testing.assert_array_equal(got.reshape(expected.shape), expected, err_msg=name)
