"""The resumable training state of the diffusion trainings: one file, so a step count always belongs to
the tensors beside it; a damaged or foreign state is discarded with a warning, never an error."""

from __future__ import annotations

import copy
import json

import pytest
import torch

from edgekit.converters.diffusion.trainstate import OLD_META, STATE, clear_state, load_state, save_state


def _trio(seed: int = 0, width: int = 4):
    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(3, width), torch.nn.Linear(width, 2))
    ema = copy.deepcopy(model).requires_grad_(False)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    model(torch.randn(5, 3)).sum().backward()
    opt.step()
    return model, ema, opt


def test_a_saved_state_is_one_file_and_comes_back_whole(tmp_path):
    model, ema, opt = _trio()
    save_state(tmp_path, 7, model, ema, opt, {"losses": [1.0, 0.5]})
    assert sorted(p.name for p in tmp_path.iterdir()) == [STATE]
    rng_next = torch.rand(3)
    m2, e2, o2 = _trio(seed=1)
    assert load_state(tmp_path, m2, e2, o2) == (7, {"losses": [1.0, 0.5]})
    assert torch.equal(torch.rand(3), rng_next)  # the random stream goes on where it was saved
    for a, b in zip(model.state_dict().values(), m2.state_dict().values(), strict=True):
        assert torch.equal(a, b)
    s1, s2 = opt.state_dict()["state"], o2.state_dict()["state"]
    assert s1.keys() == s2.keys()
    assert all(torch.equal(s1[i]["exp_avg"], s2[i]["exp_avg"]) for i in s1)


@pytest.mark.parametrize("damage", ["truncated", "garbage", "other-model", "no-meta"])
def test_a_state_that_cannot_be_read_back_is_discarded_with_a_warning(tmp_path, damage):
    model, ema, opt = _trio()
    save_state(tmp_path, 3, model, ema, opt, {})
    f = tmp_path / STATE
    if damage == "truncated":
        f.write_bytes(f.read_bytes()[:-40])
    elif damage == "garbage":
        f.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json}......")
    elif damage == "other-model":
        save_state(tmp_path, 3, *_trio(width=6), {})
    else:
        from safetensors.torch import save_file

        save_file({"rng": torch.get_rng_state()}, str(f))
    m2, e2, o2 = _trio(seed=1)
    before = [p.clone() for p in m2.parameters()]
    with pytest.warns(UserWarning, match="discarded it: training starts over"):
        assert load_state(tmp_path, m2, e2, o2) is None
    assert not f.exists()
    assert all(torch.equal(a, b) for a, b in zip(before, m2.parameters(), strict=True))  # untouched


def test_an_old_two_file_state_is_not_paired_with_new_tensors(tmp_path):
    (tmp_path / OLD_META).write_text(json.dumps({"step": 99, "param_groups": [], "extra": {}}))
    assert load_state(tmp_path, *_trio()) is None and not (tmp_path / OLD_META).exists()
    model, ema, opt = _trio()
    (tmp_path / OLD_META).write_text("{}")
    save_state(tmp_path, 2, model, ema, opt, {})
    assert not (tmp_path / OLD_META).exists()
    clear_state(tmp_path)
    assert list(tmp_path.iterdir()) == []
