"""The artifacts screen lists a diffusion pipeline and inspects it as a grid of images it samples."""

from __future__ import annotations

import importlib.util

import numpy as np
import pytest

from edgekit.tui.app import EdgekitApp
from edgekit.tui.screens.artifacts import SamplesScreen
from edgekit.tui.widgets.sample_grid import UPPER_HALF, halfblock_grid
from tests.converters.diffusion.tiny import tiny_pipeline
from tests.tui.conftest import wait_for

if importlib.util.find_spec("diffusers") is None:
    pytest.skip("diffusers is not installed (pip install 'edgekit[diffusion]')", allow_module_level=True)


def test_halfblock_grid_draws_two_pixel_rows_per_line():
    img = -np.ones((2, 1, 4, 4), np.float32)
    img[0, 0, 0, 0] = 1.0  # a white top-left pixel over a black one
    text = halfblock_grid(img, cols=2, captions=["a", "b"])
    lines = text.plain.split("\n")
    assert lines[0].startswith("a   ") and lines[1:] == [f"{UPPER_HALF * 4} {UPPER_HALF * 4}"] * 2
    first = next(s for s in text.spans if s.start == len(lines[0]) + 1)
    assert str(first.style) == "#ffffff on #000000"
    assert len([s for s in text.spans if str(s.style) == "#000000 on #000000"]) == 2 * 4 * 2 - 1


@pytest.mark.anyio
async def test_diffusion_pipeline_is_inspected_as_a_sample_grid(tmp_path, monkeypatch):
    tiny_pipeline(tmp_path / "models" / "tiny-pipe", sample_size=16)
    monkeypatch.chdir(tmp_path)
    app = EdgekitApp(folder="models")
    async with app.run_test(size=(100, 40)) as pilot:
        screen = app.get_screen("artifacts")
        await wait_for(pilot, lambda: len(screen.rows) == 1, what="the pipeline in the list")
        row = screen.rows[0]
        assert (row.name, row.format, row.method, row.task) == ("tiny-pipe", "diffusers", "ddim 50", "diffusion")
        await pilot.press("enter")
        await wait_for(pilot, lambda: isinstance(app.screen, SamplesScreen) and app.screen.images is not None,
                       what="the samples")
        samples = app.screen
        grid = samples.query_one("#samples-grid").render()
        assert grid.plain.count(UPPER_HALF) == SamplesScreen.N * 16 * 8
        assert all(f"class {k}" in grid.plain for k in range(SamplesScreen.N))
        assert "ddim 50 steps" in str(samples.query_one("#samples-summary").render())
        first = samples.images
        await pilot.press("r")  # new noise, new images
        await wait_for(pilot, lambda: samples.images is not first, what="new samples")
        assert samples.seed == 1 and not np.array_equal(first, samples.images)
        await pilot.press("escape")
        assert app.screen is screen
