"""edgekit.devices: discovery of this host and attached devices, verified pushes, profiling on devices.

    from edgekit.devices import list_devices, open_device, push, PushConfig
    found = list_devices()                       # host, Android (adb), iOS (usbmuxd), SSH boards
    with open_device("ssh:jetson") as dev:
        push("./smol-q4", dev, PushConfig(dest="~/models"), progress=print)

Platform modules import their heavy clients (adbutils, paramiko, pymobiledevice3) lazily.
"""

from __future__ import annotations

from collections.abc import Iterable

from edgekit.devices.base import (
    PLATFORMS,
    Device,
    DeviceDisconnected,
    DeviceError,
    DeviceInfo,
    DevicePermissionError,
    Discovery,
    InsufficientMemoryError,
    PushCancelled,
    PushInProgress,
    VerificationError,
    split_device_id,
)
from edgekit.devices.transfer import FitReport, PushConfig, PushResult, check_fit, push

__all__ = ["Device", "DeviceDisconnected", "DeviceError", "DeviceInfo", "DevicePermissionError", "Discovery",
           "FitReport", "InsufficientMemoryError", "PushCancelled", "PushConfig", "PushInProgress",
           "PushResult", "VerificationError", "check_fit", "list_devices", "open_device", "push"]

ORDER = ("host", "android", "ios", "ssh")


def list_devices(platforms: Iterable[str] | None = None) -> Discovery:
    """Every device edgekit can see, host first; a platform that finds nothing says why in ``notes``."""
    found = Discovery()
    wanted = list(platforms) if platforms is not None else [p for p in ORDER if p in PLATFORMS.names()]
    for name in wanted:
        devices, note = PLATFORMS.get(name)().discover()
        found.devices.extend(devices)
        if note:
            found.notes[name] = note
    return found


def open_device(device_id: str) -> Device:
    """Open ``host``, ``android:SERIAL``, ``ios:UDID`` or ``ssh:NAME``; unknown ids raise InputError."""
    platform, ident = split_device_id(device_id)
    return PLATFORMS.get(platform)().open(ident)
