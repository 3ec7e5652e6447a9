"""Image quality for the digits miniature: a "digits-FID", precision/recall and label agreement.

FID (Heusel et al. 2017) needs a feature network trained on the images' own domain; Inception features
say little about 16x16 digits. edgekit ships a small CNN classifier trained on scikit-learn's digits
(``edgekit/data/digits-features.safetensors``, ~90k parameters) whose 64-d penultimate layer gives the
features. Inference is numpy only, so the torch-free runtime can score too. The file also holds the
features of the fixed reference set (the classifier's training split), so every model is compared
against the same statistics:

* FID: Fréchet distance between Gaussians fitted to generated and reference features.
* precision / recall (Kynkäänniemi et al. 2019): the share of generated samples inside the k-NN
  manifold of the reference features, and the share of reference samples inside the generated one (k=3).
* label agreement: the classifier's accuracy on generated images against the classes they were
  conditioned on.

FID has a sample-size bias, so compare models at the same N (1000 images, 100 per class, is the
default); the FID of the held-out real split (1000 images, never seen by the classifier) is the floor.
The weights are reproduced by::

    python -m edgekit.converters.diffusion.metricnet -o edgekit/data/digits-features.safetensors
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from edgekit.errors import CorruptFileError, InputError

DEFAULT_WEIGHTS = Path(__file__).parent / "data" / "digits-features.safetensors"
SIZE = 16  # the images the network takes: [n, 1, 16, 16] in [-1, 1]
# (name, kind, in, out): the network, in order. conv = 3x3, stride 1, padding 1, then ReLU; "pool" halves.
LAYERS: tuple[tuple[str, str, int, int], ...] = (
    ("conv1", "conv", 1, 16), ("conv2", "conv", 16, 32), ("pool1", "pool", 32, 32),
    ("conv3", "conv", 32, 64), ("pool2", "pool", 64, 64),
    ("fc1", "linear", 64 * 4 * 4, 64), ("fc2", "linear", 64, 10),
)
FEATURES = 64
NUM_CLASSES = 10
HELDOUT_PER_CLASS = 100
SPLIT_SEED = 0


def split_indices(labels: np.ndarray, per_class: int = HELDOUT_PER_CLASS, seed: int = SPLIT_SEED
                  ) -> tuple[np.ndarray, np.ndarray]:
    """The fixed split of a labelled set: (reference/train indices, held-out indices with ``per_class`` of
    each class). The same labels and seed always give the same split."""
    rng = np.random.default_rng(seed)
    held: list[np.ndarray] = []
    for c in np.unique(labels):
        idx = np.flatnonzero(labels == c)
        if len(idx) <= per_class:
            raise InputError(f"class {c} has {len(idx)} images; the held-out split needs more than {per_class}")
        held.append(rng.permutation(idx)[:per_class])
    heldout = np.sort(np.concatenate(held))
    train = np.setdiff1d(np.arange(len(labels)), heldout)
    return train, heldout


# -- the network in numpy ------------------------------------------------------------------------


def conv3x3(x: np.ndarray, w: np.ndarray, b: np.ndarray) -> np.ndarray:
    """PyTorch's ``conv2d(x, w, b, padding=1)`` for 3x3 kernels, as one matrix product over patches."""
    n, c, h, wd = x.shape
    xp = np.pad(x, ((0, 0), (0, 0), (1, 1), (1, 1)))
    patches = np.lib.stride_tricks.sliding_window_view(xp, (3, 3), axis=(2, 3))  # n, c, h, w, 3, 3
    cols = patches.transpose(0, 2, 3, 1, 4, 5).reshape(n * h * wd, c * 9)
    out = cols @ w.reshape(w.shape[0], -1).T + b
    return out.reshape(n, h, wd, -1).transpose(0, 3, 1, 2)


def maxpool2(x: np.ndarray) -> np.ndarray:
    n, c, h, w = x.shape
    return x.reshape(n, c, h // 2, 2, w // 2, 2).max(axis=(3, 5))


@dataclass
class FeatureNet:
    """The digits classifier: ``features`` (64-d, before the last ReLU) and ``logits``; ``meta`` is what
    training recorded (split, accuracy, command); ``reference`` the features of the reference split."""

    weights: dict[str, np.ndarray]
    reference: np.ndarray
    meta: dict[str, str] = field(default_factory=dict)

    @classmethod
    def load(cls, path: str | Path | None = None) -> FeatureNet:
        from safetensors import SafetensorError
        from safetensors.numpy import load_file

        p = Path(path) if path is not None else DEFAULT_WEIGHTS
        if not p.is_file():
            raise InputError(f"{p} does not exist; rebuild the digits feature network with "
                             "'python -m edgekit.converters.diffusion.metricnet -o {p}'")
        try:
            tensors = load_file(str(p))
            from safetensors import safe_open

            with safe_open(str(p), "np") as f:
                meta = dict(f.metadata() or {})
        except (SafetensorError, OSError) as exc:
            raise CorruptFileError(f"{p} is not a readable safetensors file ({exc}); rebuild it") from exc
        want = {f"{name}.{k}" for name, kind, _, _ in LAYERS if kind != "pool" for k in ("weight", "bias")}
        if not want <= tensors.keys() or "reference" not in tensors:
            missing = sorted((want | {"reference"}) - tensors.keys())[0]
            raise CorruptFileError(f"{p} lacks {missing}; it is not edgekit's digits feature network: rebuild it")
        weights = {k: v.astype(np.float32) for k, v in tensors.items() if k != "reference"}
        return cls(weights=weights, reference=tensors["reference"].astype(np.float64), meta=meta)

    def _forward(self, x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        w = self.weights
        h = x.astype(np.float32)
        feats = h
        for name, kind, _, _ in LAYERS:
            if kind == "conv":
                h = np.maximum(conv3x3(h, w[f"{name}.weight"], w[f"{name}.bias"]), 0)
            elif kind == "pool":
                h = maxpool2(h)
            else:
                if h.ndim > 2:
                    h = h.reshape(len(h), -1)
                if name == "fc2":
                    feats = h
                    h = np.maximum(h, 0)
                h = h @ w[f"{name}.weight"].T + w[f"{name}.bias"]
        return feats, h

    def features_and_logits(self, images: np.ndarray, batch: int = 250) -> tuple[np.ndarray, np.ndarray]:
        """Features ``[n, 64]`` and logits ``[n, 10]`` of images ``[n, 1, 16, 16]`` in ``[-1, 1]``."""
        images = check_images(images)
        outs = [self._forward(images[i:i + batch]) for i in range(0, len(images), batch)]
        return np.concatenate([o[0] for o in outs]), np.concatenate([o[1] for o in outs])

    def features(self, images: np.ndarray) -> np.ndarray:
        return self.features_and_logits(images)[0]

    def predict(self, images: np.ndarray) -> np.ndarray:
        return self.features_and_logits(images)[1].argmax(-1)


def check_images(images: np.ndarray) -> np.ndarray:
    x = np.asarray(images)
    if x.ndim != 4 or x.shape[1:] != (1, SIZE, SIZE):
        raise InputError(f"digits metrics take images [n, 1, {SIZE}, {SIZE}] (got {list(x.shape)}): the feature "
                         "network knows 16x16 one-channel digits only")
    if len(x) < 2:
        raise InputError("digits metrics need at least 2 images")
    return x


# -- the metrics ---------------------------------------------------------------------------------


def frechet_distance(a: np.ndarray, b: np.ndarray) -> float:
    """FID between feature sets ``a`` and ``b`` ([n, d]): |mu_a - mu_b|^2 + tr(S_a + S_b - 2 (S_a S_b)^1/2).

    tr((S_a S_b)^1/2) is taken as the sum of the square roots of the eigenvalues of S_a^1/2 S_b S_a^1/2, a
    symmetric positive semi-definite matrix: real and stable where a general sqrtm of S_a S_b is not."""
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    mu = a.mean(0) - b.mean(0)
    sa, sb = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    ev, vec = np.linalg.eigh(sa)
    root_a = (vec * np.sqrt(np.clip(ev, 0, None))) @ vec.T
    mid = np.linalg.eigvalsh(root_a @ sb @ root_a)
    cross = float(np.sqrt(np.clip(mid, 0, None)).sum())
    return max(0.0, float(mu @ mu + np.trace(sa) + np.trace(sb) - 2 * cross))


def _sq_dists(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    d = (a * a).sum(1)[:, None] + (b * b).sum(1)[None, :] - 2 * a @ b.T
    return np.maximum(d, 0)


def knn_radii(x: np.ndarray, k: int) -> np.ndarray:
    """Squared distance of each row of ``x`` to its ``k``-th nearest other row."""
    d = _sq_dists(x, x)
    np.fill_diagonal(d, np.inf)
    return np.partition(d, k - 1, axis=1)[:, k - 1]


def coverage_of(manifold: np.ndarray, queries: np.ndarray, k: int) -> float:
    """The share of ``queries`` inside the union of k-NN balls around the rows of ``manifold``."""
    radii = knn_radii(manifold, k)
    inside = (_sq_dists(queries, manifold) <= radii[None, :]).any(axis=1)
    return float(inside.mean())


def precision_recall(real: np.ndarray, fake: np.ndarray, k: int = 3) -> tuple[float, float]:
    """Improved precision and recall (Kynkäänniemi et al. 2019) of features ``fake`` against ``real``."""
    real, fake = np.asarray(real, np.float64), np.asarray(fake, np.float64)
    if min(len(real), len(fake)) <= k:
        raise InputError(f"precision/recall with k={k} need more than {k} images in each set")
    return coverage_of(real, fake, k), coverage_of(fake, real, k)


def score(images: np.ndarray, labels: np.ndarray | None = None, net: FeatureNet | None = None,
          k: int = 3) -> dict[str, Any]:
    """All the metrics of ``images`` ([n, 1, 16, 16] in [-1, 1]) against the network's reference set;
    ``labels``: the classes they were conditioned on (adds label agreement)."""
    net = net or FeatureNet.load()
    feats, logits = net.features_and_logits(images)
    precision, recall = precision_recall(net.reference, feats, k)
    out: dict[str, Any] = {"fid": frechet_distance(feats, net.reference), "precision": precision,
                           "recall": recall, "label_agreement": None, "n": int(len(feats)),
                           "reference_n": int(len(net.reference)), "k": k}
    if labels is not None:
        labels = np.asarray(labels)
        if labels.shape != (len(feats),):
            raise InputError(f"{len(labels)} labels for {len(feats)} images")
        out["label_agreement"] = float((logits.argmax(-1) == labels).mean())
    return out
