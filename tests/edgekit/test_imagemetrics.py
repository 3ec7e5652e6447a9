"""The digits metrics: the shipped feature network separates real digits from noise, blur and shuffled
pixels; precision/recall behave; the numpy forward equals the torch network it was trained as."""

from __future__ import annotations

import importlib.util
import json

import numpy as np
import pytest

from edgekit import imagemetrics as im
from edgekit.errors import CorruptFileError, InputError

needs_data = pytest.mark.skipif(importlib.util.find_spec("sklearn") is None or importlib.util.find_spec("torch") is None,
                                reason="the digits need scikit-learn and torch (pip install 'edgekit[diffusion]')")


@pytest.fixture(scope="module")
def net() -> im.FeatureNet:
    return im.FeatureNet.load()


@pytest.fixture(scope="module")
def data():
    from edgekit.converters.diffusion.miniature import digits

    x, y = digits(im.SIZE)
    tr, ho = im.split_indices(y)
    return x, y, tr, ho


@pytest.fixture(scope="module")
def heldout_score(net, data):
    x, y, _, ho = data
    return im.score(x[ho], y[ho], net)


def test_split_is_fixed_balanced_and_disjoint():
    labels = np.repeat(np.arange(10), 150)
    tr, ho = im.split_indices(labels)
    tr2, ho2 = im.split_indices(labels)
    assert np.array_equal(ho, ho2) and np.array_equal(tr, tr2)
    assert np.bincount(labels[ho]).tolist() == [100] * 10
    assert not set(tr) & set(ho) and len(tr) + len(ho) == len(labels)
    short = np.concatenate([labels[labels != 3], np.full(50, 3)])
    with pytest.raises(InputError, match="class 3 has 50 images"):
        im.split_indices(short)


@needs_data
def test_real_digits_score_far_better_than_noise_blur_and_shuffled_pixels(net, data, heldout_score):
    import torch

    x, y, _, ho = data
    rng = np.random.default_rng(1)
    real = heldout_score["fid"]
    noise = im.score(rng.uniform(-1, 1, x[ho].shape).astype(np.float32), y[ho], net)
    blur = torch.nn.functional.avg_pool2d(torch.from_numpy(x[ho]), 3, 1, 1, count_include_pad=False).numpy()
    shuffled = x[ho].reshape(len(ho), -1)[:, rng.permutation(im.SIZE * im.SIZE)].reshape(x[ho].shape)
    fids = {"noise": noise["fid"], "blur": im.score(blur, y[ho], net)["fid"],
            "shuffled": im.score(shuffled, y[ho], net)["fid"]}
    assert all(f > 10 * real for f in fids.values()), (real, fids)
    assert noise["precision"] < 0.05 and noise["recall"] < 0.05
    assert heldout_score["precision"] > 0.8 and heldout_score["recall"] > 0.8


@needs_data
def test_label_agreement_of_real_digits_is_the_classifier_accuracy(net, heldout_score):
    record = json.loads(net.meta["record"])
    assert heldout_score["label_agreement"] == pytest.approx(record["heldout_accuracy"], abs=2e-3)
    assert record["heldout_accuracy"] > 0.97
    assert heldout_score["fid"] == pytest.approx(record["fid_floor_heldout"], rel=1e-3)  # the floor it ships


@needs_data
def test_recall_drops_when_fewer_classes_are_covered(net, data, heldout_score):
    x, y, _, ho = data
    few = ho[np.isin(y[ho], [0, 1, 2])]
    s = im.score(x[few], y[few], net)
    assert 0 <= s["precision"] <= 1 and 0 <= s["recall"] <= 1
    assert s["recall"] < 0.5 * heldout_score["recall"]
    assert s["precision"] > 0.8  # what it makes is still real-looking
    assert s["fid"] > 10 * heldout_score["fid"]


def test_frechet_distance_is_zero_for_identical_sets_and_symmetric():
    rng = np.random.default_rng(0)
    a = rng.standard_normal((500, 16)) @ rng.standard_normal((16, 16))
    b = rng.standard_normal((400, 16)) * 2 + 1
    assert im.frechet_distance(a, a) == pytest.approx(0, abs=1e-6)
    assert im.frechet_distance(a, b) == pytest.approx(im.frechet_distance(b, a), rel=1e-6)
    # two Gaussians with known parameters: |mu|^2 + tr(S1 + S2 - 2 sqrt(S1 S2)) = d + d*(1 + 4 - 2*2) = 2d
    c, d = rng.standard_normal((200_000, 4)), rng.standard_normal((200_000, 4)) * 2 + 1
    assert im.frechet_distance(c, d) == pytest.approx(8.0, rel=0.02)


def test_precision_recall_on_known_manifolds():
    rng = np.random.default_rng(0)
    real = rng.standard_normal((400, 8))
    same = rng.standard_normal((400, 8))
    far = rng.standard_normal((400, 8)) + 20
    p, r = im.precision_recall(real, same)
    assert p > 0.8 and r > 0.8
    assert im.precision_recall(real, far) == (0.0, 0.0)
    half = np.concatenate([same[:200], far[:200]])
    p, r = im.precision_recall(real, half)
    assert 0.35 < p < 0.55
    with pytest.raises(InputError, match="more than 3"):
        im.precision_recall(real, same[:3])


def test_numpy_forward_equals_the_torch_network(net, data):
    pytest.importorskip("torch")
    import torch

    from edgekit.converters.diffusion.metricnet import torch_net

    t = torch_net()
    t.load_state_dict({k: torch.from_numpy(v) for k, v in net.weights.items()})
    x = data[0][:64]
    with torch.no_grad():
        f, logits = t(torch.from_numpy(x))
    f2, logits2 = net.features_and_logits(x)
    np.testing.assert_allclose(f2, f.numpy(), atol=1e-3, rtol=1e-4)
    np.testing.assert_allclose(logits2, logits.numpy(), atol=1e-3, rtol=1e-4)
    conv = net.weights["conv2.weight"], net.weights["conv2.bias"]
    h = np.random.default_rng(0).standard_normal((3, 16, 7, 9)).astype(np.float32)  # odd shapes too
    ref = torch.nn.functional.conv2d(torch.from_numpy(h), *map(torch.from_numpy, conv), padding=1).numpy()
    np.testing.assert_allclose(im.conv3x3(h, *conv), ref, atol=1e-4)


def test_bad_inputs_are_one_line_errors(net, tmp_path):
    with pytest.raises(InputError, match="16x16 one-channel"):
        net.features(np.zeros((4, 3, 32, 32), np.float32))
    with pytest.raises(InputError, match="labels for"):
        im.score(np.zeros((8, 1, 16, 16), np.float32), np.zeros(3, np.int64), net)
    bad = tmp_path / "f.safetensors"
    bad.write_bytes(b"not safetensors")
    with pytest.raises(CorruptFileError, match="not a readable safetensors"):
        im.FeatureNet.load(bad)
    with pytest.raises(InputError, match="does not exist"):
        im.FeatureNet.load(tmp_path / "missing.safetensors")


@needs_data
def test_training_command_writes_a_loadable_network(tmp_path):
    from edgekit.converters.diffusion.metricnet import main

    out = tmp_path / "feats.safetensors"
    assert main(["-o", str(out), "--epochs", "1"]) == 0
    fnet = im.FeatureNet.load(out)
    record = json.loads(fnet.meta["record"])
    assert record["reference_n"] == len(fnet.reference) == 797 and record["heldout_n"] == 1000
    assert record["heldout_accuracy"] > 0.2  # one epoch (13 steps) is already well above chance (0.1)
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temp file left behind
