"""An MLC artifact pushed to Android lands where MLC's Android app (MLCChat) reads models: its external
files folder, one folder per model id holding mlc-chat-config.json and tensor-cache.json."""

from __future__ import annotations

import json

import pytest
from typer.testing import CliRunner

from edgekit.cli.main import app

runner = CliRunner()
MLCCHAT = "/storage/emulated/0/Android/data/ai.mlc.mlcchat/files"


@pytest.fixture(scope="module")
def mlc_artifact(tiny_llama, tmp_path_factory):
    from edgekit import api

    return api.convert(tiny_llama, "mlc", output=tmp_path_factory.mktemp("mlc") / "tiny-q4f16_1-MLC").path


def _shared_storage(standin) -> None:
    """A phone's shared storage: /storage/emulated/0 exists and adb's shell user may write under it (as
    MLC's own bundle_weight.py relies on)."""
    path = standin.host_path("/storage/emulated/0")
    path.mkdir(parents=True, exist_ok=True)
    for p in (path, *list(path.parents)[:2]):
        p.chmod(0o777)


def test_push_puts_an_mlc_artifact_where_mlcchat_reads_it(phone, mlc_artifact):
    standin, dev_id = phone
    _shared_storage(standin)
    r = runner.invoke(app, ["push", str(mlc_artifact), dev_id, "--json"])
    assert r.exit_code == 0, r.output
    assert json.loads(r.output[r.output.index("{"):])["remote_dir"] == f"{MLCCHAT}/tiny-q4f16_1-MLC"
    remote = standin.host_path(f"{MLCCHAT}/tiny-q4f16_1-MLC")
    for name in ("mlc-chat-config.json", "tensor-cache.json", "params_shard_0.bin", "tokenizer.json", "edgekit.json"):
        assert (remote / name).read_bytes() == (mlc_artifact / name).read_bytes(), name


def test_dest_still_wins(phone, mlc_artifact):
    standin, dev_id = phone
    r = runner.invoke(app, ["push", str(mlc_artifact), dev_id, "--dest", "/data/local/tmp/models"])
    assert r.exit_code == 0, r.output
    assert (standin.host_path("/data/local/tmp/models/tiny-q4f16_1-MLC") / "tensor-cache.json").exists()
