"""Training of the digits feature network that :mod:`edgekit.imagemetrics` scores images with.

A small CNN classifier (the layers in ``imagemetrics.LAYERS``) trained on the reference split of the
digits (everything but 100 held-out images per class), with one-pixel shifts as augmentation. About a
minute on two CPU cores. The shipped ``edgekit/data/digits-features.safetensors`` is reproduced by::

    python -m edgekit.converters.diffusion.metricnet -o edgekit/data/digits-features.safetensors

(same seed, same split; PyTorch's CPU kernels may differ in the last bits between versions and thread
counts, so the weights agree to rounding, not bit for bit).
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from edgekit import imagemetrics as im
from edgekit.converters.diffusion.miniature import digits
from edgekit.progress import ProgressFn, no_progress


@dataclass(frozen=True)
class MetricNetConfig:
    """epochs: passes over the reference split; batch: images per step; lr: Adam's peak learning rate
    (cosine decay); shift: the largest random translation in pixels; seed: initialisation and batches."""

    epochs: int = 40
    batch: int = 64
    lr: float = 2e-3
    shift: int = 1
    seed: int = 0

    def __post_init__(self) -> None:
        if self.epochs < 1 or self.batch < 1 or self.shift < 0:
            raise ValueError("epochs and batch must be positive, shift >= 0")


def torch_net() -> Any:
    """The network of ``imagemetrics.LAYERS`` as a torch module (parameter names match the file's)."""
    import torch
    from torch import nn

    class Net(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            for name, kind, cin, cout in im.LAYERS:
                if kind == "conv":
                    setattr(self, name, nn.Conv2d(cin, cout, 3, padding=1))
                elif kind == "linear":
                    setattr(self, name, nn.Linear(cin, cout))

        def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            h, feats = x, x
            for name, kind, _, _ in im.LAYERS:
                if kind == "conv":
                    h = torch.relu(getattr(self, name)(h))
                elif kind == "pool":
                    h = torch.nn.functional.max_pool2d(h, 2)
                else:
                    h = h.flatten(1)
                    if name == "fc2":
                        feats, h = h, torch.relu(h)
                    h = getattr(self, name)(h)
            return feats, h

    return Net()


def shift_batch(x: Any, shift: int, g: Any) -> Any:
    """Each image moved by up to ``shift`` pixels each way, the border filled with background (-1)."""
    import torch

    if shift == 0:
        return x
    n, _, h, w = x.shape
    padded = torch.nn.functional.pad(x, (shift, shift, shift, shift), value=-1.0)
    dy, dx = torch.randint(0, 2 * shift + 1, (2, n), generator=g)
    return torch.stack([padded[i, :, dy[i]:dy[i] + h, dx[i]:dx[i] + w] for i in range(n)])


def train(out: Path, cfg: MetricNetConfig = MetricNetConfig(), progress: ProgressFn = no_progress) -> dict[str, Any]:
    """Train the network, write weights + reference features + record to ``out`` (atomically); return the
    record (held-out accuracy, FID of the held-out split against the reference: the floor)."""
    import torch
    from safetensors.numpy import save

    from edgekit.fsutil import atomic_file

    t0 = time.monotonic()
    x_all, y_all = digits(im.SIZE)
    tr, ho = im.split_indices(y_all)
    x, y = torch.from_numpy(x_all[tr]), torch.from_numpy(y_all[tr])
    torch.manual_seed(cfg.seed)
    net = torch_net()
    opt = torch.optim.Adam(net.parameters(), lr=cfg.lr)
    steps_per_epoch = (len(x) + cfg.batch - 1) // cfg.batch
    total = cfg.epochs * steps_per_epoch
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, total)
    g = torch.Generator().manual_seed(cfg.seed)
    step = 0
    net.train()
    for _ in range(cfg.epochs):
        order = torch.randperm(len(x), generator=g)
        for i in range(0, len(x), cfg.batch):
            idx = order[i:i + cfg.batch]
            _, logits = net(shift_batch(x[idx], cfg.shift, g))
            loss = torch.nn.functional.cross_entropy(logits, y[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            step += 1
            progress("training the digits feature network", step, total)
    weights = {k: v.detach().numpy().astype(np.float32).copy() for k, v in net.state_dict().items()}
    fnet = im.FeatureNet(weights=weights, reference=np.zeros((0, im.FEATURES)))
    ref_feats, ref_logits = fnet.features_and_logits(x_all[tr])
    fnet.reference = ref_feats.astype(np.float64)
    ho_feats, ho_logits = fnet.features_and_logits(x_all[ho])
    record = {
        "heldout_accuracy": round(float((ho_logits.argmax(-1) == y_all[ho]).mean()), 4),
        "train_accuracy": round(float((ref_logits.argmax(-1) == y_all[tr]).mean()), 4),
        "fid_floor_heldout": round(im.frechet_distance(ho_feats, ref_feats), 4),
        "reference_n": len(tr), "heldout_n": len(ho), "split_seed": im.SPLIT_SEED,
        "heldout_per_class": im.HELDOUT_PER_CLASS, "config": asdict(cfg), "torch": torch.__version__,
        "params": int(sum(v.size for v in weights.values())), "seconds": round(time.monotonic() - t0, 1),
        "command": "python -m edgekit.converters.diffusion.metricnet -o edgekit/data/digits-features.safetensors",
    }
    tensors = {**weights, "reference": ref_feats.astype(np.float32)}
    with atomic_file(Path(out)) as tmp:
        # bytes into the temp file (save_file would re-create it private, 0600)
        tmp.write_bytes(save(tensors, metadata={"edgekit": "digits-features/1", "record": json.dumps(record)}))
    return record


def main(argv: list[str] | None = None) -> int:
    import argparse

    from rich.progress import Progress

    ap = argparse.ArgumentParser(description="Train the digits feature network behind edgekit's digits-FID.")
    ap.add_argument("-o", "--out", required=True, type=Path)
    ap.add_argument("--epochs", type=int, default=MetricNetConfig.epochs)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    cfg = MetricNetConfig(epochs=args.epochs, seed=args.seed)
    with Progress() as bar:
        task = bar.add_task("training", total=None)
        rec = train(args.out, cfg, progress=lambda d, n, t: bar.update(task, completed=n, total=t, description=d))
    print(json.dumps(rec, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
