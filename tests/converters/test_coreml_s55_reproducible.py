"""The same model gives the same Core ML package, byte for byte, in another process: protobuf's map order
and coremltools' random item UUIDs no longer change the sha256 values in edgekit.json. The package is still
one coremltools and libmodelpackage read, and reading it changes nothing."""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("coremltools")

_CONVERT = ("import sys\nfrom edgekit import api\n"
            "api.convert(sys.argv[1], 'coreml', output=sys.argv[2], recipe=api.ConvertRecipe(bits=4, extra={'block_size': 32}))\n")


def _digests(folder: Path) -> dict[str, str]:
    return {p.relative_to(folder).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file() and p.name != "edgekit.json"}


@pytest.fixture(scope="module")
def two_builds(tmp_path_factory) -> tuple[Path, Path]:
    from edgekit import api
    from tests.helpers import build_tiny_model

    root = tmp_path_factory.mktemp("repro")
    src = build_tiny_model(root / "src", "LlamaForCausalLM", hidden=64, ffn=128, layers=2)
    api.convert(src, "coreml", output=root / "a", recipe=api.ConvertRecipe(bits=4, extra={"block_size": 32}))
    # another process: protobuf's map order follows a hash seed of its own
    subprocess.run([sys.executable, "-c", _CONVERT, str(src), str(root / "b")], check=True, capture_output=True)
    return root / "a", root / "b"


def test_two_builds_are_byte_identical(two_builds):
    a, b = two_builds
    da, db = _digests(a), _digests(b)
    assert "model.mlpackage/Manifest.json" in da and "model.mlpackage/Data/com.apple.CoreML/model.mlmodel" in da
    assert da == db
    ma, mb = (json.loads((d / "edgekit.json").read_text()) for d in two_builds)
    assert ma["sha256"] == mb["sha256"] and ma["sha256"]["model.mlpackage/Manifest.json"] == da[
        "model.mlpackage/Manifest.json"]


def test_the_package_still_loads_and_reading_it_changes_nothing(two_builds):
    import uuid

    from edgekit.converters.formats.coreml.package import coremltools
    from edgekit.converters.formats.coreml.program import Blockwise
    from edgekit.converters.formats.coreml.read import read_weights

    ct = coremltools()
    pkg = two_builds[0] / "model.mlpackage"
    before = _digests(pkg)
    manifest = json.loads((pkg / "Manifest.json").read_text())
    root = manifest["rootModelIdentifier"]
    items = manifest["itemInfoEntries"]
    assert root in items and items[root]["name"] == "model.mlmodel" and len(items) == 2
    assert all(uuid.UUID(i).version == 5 and (pkg / "Data" / item["path"]).exists() for i, item in items.items())
    spec = ct.utils.load_spec(str(pkg))  # libmodelpackage opens it, and writes its manifest back on closing
    assert spec.WhichOneof("Type") == "mlProgram" and "main" in spec.mlProgram.functions
    assert spec.description.metadata.userDefined["edgekit.n_layer"] == "2"
    model = ct.models.MLModel(str(pkg), skip_model_load=True)
    assert [i.name for i in model.get_spec().description.input] == ["input_ids", "causal_mask"]
    assert isinstance(read_weights(pkg)["model_layers_1_mlp_down_proj_weight"], Blockwise)
    raw = (pkg / "Data" / items[root]["path"]).read_bytes()
    assert raw == spec.SerializeToString(deterministic=True)  # maps in sorted order, whatever the process
    assert _digests(pkg) == before


def test_a_second_conversion_in_one_process_writes_the_same_bytes(two_builds, tmp_path):
    """coremltools numbers op names from one counter per process: the SDK's second conversion (a test's, a
    script's loop) named its ops on from the first and wrote other bytes than a conversion in a new process."""
    from edgekit import api

    src = two_builds[0].parent / "src"
    api.convert(src, "coreml", output=tmp_path / "c", recipe=api.ConvertRecipe(bits=4, extra={"block_size": 32}))
    assert _digests(tmp_path / "c") == _digests(two_builds[1])  # b: converted in a fresh process
