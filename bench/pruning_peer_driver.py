"""The peer's side of ``bench/pruning_peer.py``: llm-compressor's Wanda or SparseGPT on a Hugging Face
checkpoint, with calibration token ids given as a ``.npy`` file. Runs in llm-compressor's own venv (it pins
its transformers), never imports edgekit, and writes the pruned checkpoint (dense safetensors holding the
zeros, config and tokenizer copied) plus ``peer.json`` (versions, time, sparsity) into a new folder.

    python pruning_peer_driver.py MODEL_DIR IDS.npy {wanda|sparsegpt} {0:0|2:4} SPARSITY OUT_DIR

Not a benchmark to run by hand: ``bench/pruning_peer.py`` makes that venv and runs this driver in it. Its
imports (datasets, llmcompressor, torch, transformers) are loaded only when it runs, so ``--help`` works in
edgekit's own venv too.
"""

from __future__ import annotations

import json
import shutil
import sys
import time
from importlib.metadata import version
from pathlib import Path

# bench/ holds scripts named like packages transformers probes for (kernels.py): keep it off the path
sys.path = [p for p in sys.path if Path(p or ".").resolve() != Path(__file__).resolve().parent]

SIDE = ("config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json",
        "special_tokens_map.json", "chat_template.jinja")


def main(model_dir: str, ids_file: str, method: str, structure: str, sparsity: str, out_dir: str) -> int:
    import numpy as np
    import torch
    from datasets import Dataset
    from llmcompressor import oneshot
    from llmcompressor.modifiers.pruning import SparseGPTModifier, WandaPruningModifier
    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM

    src, out = Path(model_dir), Path(out_dir)
    ids = np.load(ids_file, allow_pickle=False)
    data = Dataset.from_dict({"input_ids": ids.tolist(), "attention_mask": np.ones_like(ids).tolist()})
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32, trust_remote_code=False)
    modifier = {"wanda": WandaPruningModifier, "sparsegpt": SparseGPTModifier}[method](
        sparsity=float(sparsity), mask_structure=structure, ignore=["re:.*lm_head"])
    t0 = time.perf_counter()
    oneshot(model=model, dataset=data, recipe=modifier, num_calibration_samples=len(ids),
            max_seq_length=ids.shape[1], shuffle_calibration_samples=False)
    seconds = time.perf_counter() - t0
    tied = model.config.tie_word_embeddings
    state = {k: v.detach().contiguous() for k, v in model.state_dict().items() if not (tied and k == "lm_head.weight")}
    linear = [v for k, v in state.items() if k.endswith("_proj.weight")]
    zeros = sum(int((v == 0).sum()) for v in linear) / sum(v.numel() for v in linear)
    out.mkdir(parents=True)
    save_file(state, str(out / "model.safetensors"), metadata={"format": "pt"})
    for name in SIDE:
        if (src / name).exists():
            shutil.copy2(src / name, out / name)
    (out / "peer.json").write_text(json.dumps({
        "tool": "llm-compressor", "modifier": type(modifier).__name__, "sparsity": float(sparsity),
        "mask_structure": structure, "calibration": list(ids.shape), "seconds": seconds,
        "zero_fraction_of_block_linears": zeros,
        "versions": {n: version(n) for n in ("llmcompressor", "transformers", "torch", "compressed-tensors")}},
        indent=2))
    print(f"{type(modifier).__name__} {structure} {sparsity}: {seconds:.1f} s, zeros {zeros:.4f}")
    return 0


if __name__ == "__main__":
    if len(sys.argv) != 7 or any(a in ("-h", "--help") for a in sys.argv[1:]):
        print(__doc__.strip())
        sys.exit(0 if any(a in ("-h", "--help") for a in sys.argv[1:]) else 2)
    sys.exit(main(*sys.argv[1:]))
