"""The draft recipe: how deep a draft is, and what it refuses."""

from __future__ import annotations

import pytest

from edgekit.converters.draft import default_prune, draft_recipe
from edgekit.errors import InputError


@pytest.mark.parametrize("n_layer, spec", [(30, "depth:20"), (24, "depth:16"), (6, "depth:4"), (4, "depth:2")])
def test_a_draft_keeps_a_third_of_the_blocks(n_layer, spec):
    assert default_prune(n_layer) == spec


def test_too_shallow_a_model_cannot_be_drafted_by_depth():
    with pytest.raises(InputError, match="too few"):
        default_prune(2)


def test_draft_recipe_refuses_width_pruning_and_keeps_the_users_type(tiny_llama):
    from edgekit.converters.formats.base import ConvertRecipe

    with pytest.raises(InputError, match="by depth"):
        draft_recipe(tiny_llama, recipe=ConvertRecipe(preset="Q8_0", prune="width:ffn=256"))
    r = draft_recipe(tiny_llama, recipe=ConvertRecipe(preset="Q8_0", prune="depth:1"), heal=None, preset=None)
    assert r.preset == "Q8_0" and r.prune == "depth:1" and r.heal is None
    assert r.draft_for["target"] == str(tiny_llama.resolve()) and r.draft_for["tokenizer"]
