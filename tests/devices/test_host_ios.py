"""This host's discovery, and iOS at pymobiledevice3's API boundary (no usbmuxd here)."""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

from edgekit.devices import list_devices, open_device
from edgekit.devices.base import parse_df_k, parse_meminfo
from edgekit.devices.host import cpu_from_proc


def test_host_matches_the_machine(home):
    import psutil

    (host,) = list_devices(["host"]).devices
    assert host.id == "host" and host.state == "ready" and host.os == "Linux"
    assert host.cores == os.cpu_count() and host.ram_total == psutil.virtual_memory().total
    model, flags = cpu_from_proc(Path("/proc/cpuinfo").read_text())
    assert host.cpu == model and set(host.cpu_features) == set(flags)
    assert host.storage_free > 0 and isinstance(host.gpus, tuple)


def test_push_to_host_is_a_verified_copy(home, tiny_artifact, tmp_path):
    from edgekit.devices import PushConfig, push

    with open_device("host") as dev:
        res = push(tiny_artifact, dev, PushConfig(dest=str(tmp_path / "copy")))
    assert sorted(f.name for f in res.files) == ["edgekit.json", "model.gguf"]
    assert (tmp_path / "copy/tiny-q8/model.gguf").read_bytes() == (tiny_artifact / "model.gguf").read_bytes()


def test_arm_cpuinfo_and_toybox_outputs():
    text = "processor\t: 0\nBogoMIPS\t: 38.40\nFeatures\t: fp asimd evtstrm aes crc32 asimddp i8mm sve\n" \
           "Hardware\t: Qualcomm Technologies, Inc SM8550\n"
    assert cpu_from_proc(text) == ("Qualcomm Technologies, Inc SM8550", ("asimd", "asimddp", "sve", "i8mm"))
    df = "Filesystem     1K-blocks    Used Available Use% Mounted on\n/dev/block/dm-5 1000 200 800 20% /data\n"
    assert parse_df_k(df) == (1000 * 1024, 800 * 1024)
    assert parse_meminfo("MemTotal: 100 kB\nMemFree: 10 kB\nMemAvailable: 50 kB\n") == (102400, 51200)


def test_ios_without_usbmuxd_is_a_note_not_a_crash():
    found = list_devices(["ios"])
    assert found.devices == []
    if importlib.util.find_spec("pymobiledevice3") is None:
        assert found.notes["ios"] == ("pymobiledevice3.usbmux is not installed (needed for ios); install it with: "
                                      "pip install 'edgekit[ios]'")
    else:  # the real library, asking a usbmuxd that is not running
        assert found.notes["ios"].startswith("no iOS devices (usbmuxd not running")
