"""iPhones and iPads through pymobiledevice3 (optional extra ``edgekit[ios]``): discovery and info.

pymobiledevice3 reaches devices through usbmuxd. Without usbmuxd (Linux hosts without the daemon,
containers) discovery says so instead of failing. iOS has no shell, so edgekit cannot hash or run
anything on the phone: pushes and on-device profiling stop with an explanation.
"""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

from edgekit.devices.base import BytesFn, Cancel, Device, DeviceInfo, Platform, RunResult, register_platform
from edgekit.errors import InputError, MissingDependencyError, UnsupportedError, require

NO_USBMUXD = "no iOS devices (usbmuxd not running; start it with 'usbmuxd' or plug the device into a Mac)"


def _mux() -> Any:
    return require("pymobiledevice3.usbmux", "ios")


def _list_serials() -> list[str]:
    mux = _mux()
    from pymobiledevice3.exceptions import ConnectionFailedToUsbmuxdError

    try:
        return [d.serial for d in asyncio.run(mux.list_devices())]
    except ConnectionFailedToUsbmuxdError as exc:
        raise UnsupportedError(NO_USBMUXD) from exc


async def _query(serial: str) -> DeviceInfo:
    from pymobiledevice3.lockdown import create_using_usbmux
    from pymobiledevice3.services.afc import AfcService

    lockdown = await create_using_usbmux(serial=serial, autopair=False)
    values = await lockdown.get_value()
    afc_info = await AfcService(lockdown).get_device_info()
    return DeviceInfo(
        id=f"ios:{serial}", platform="ios", name=str(values.get("DeviceName", serial)),
        model=str(values.get("ProductType")), os="iOS", os_version=str(values.get("ProductVersion")),
        arch=str(values.get("CPUArchitecture", "arm64")).replace("arm64e", "aarch64").replace("arm64", "aarch64"),
        soc=str(values.get("HardwareModel")), storage_path="/",
        storage_total=int(afc_info.get("FSTotalBytes", 0)) or None,
        storage_free=int(afc_info.get("FSFreeBytes", 0)) or None)


class IOSDevice(Device):
    platform = "ios"

    def default_dest(self) -> str:
        return "/edgekit"

    def info(self) -> DeviceInfo:
        return asyncio.run(_query(self.ident))

    def _no_shell(self) -> UnsupportedError:
        return UnsupportedError(f"{self.id}: iOS has no shell, so edgekit cannot verify, run or profile there; "
                                "ship the artifact inside your app (or use Xcode's device file transfer)")

    def run(self, command: str, timeout: float | None = 600) -> RunResult:
        raise self._no_shell()

    def append_from(self, local: Path, remote: str, offset: int, on_bytes: BytesFn, cancel: Cancel | None) -> None:
        raise self._no_shell()


@register_platform("ios")
class IOSPlatform(Platform):
    name = "ios"

    def discover(self) -> tuple[list[DeviceInfo], str | None]:
        try:
            serials = _list_serials()
        except (MissingDependencyError, UnsupportedError) as exc:
            return [], str(exc)
        found = []
        for serial in serials:
            try:
                found.append(asyncio.run(_query(serial)))
            except Exception as exc:  # noqa: BLE001 - a locked or unpaired phone is listed, not fatal
                found.append(DeviceInfo(id=f"ios:{serial}", platform="ios", name=serial, state="unauthorized",
                                        detail=f"{type(exc).__name__}: {exc}; unlock it and trust this computer"))
        return found, None if found else "no iOS devices connected"

    def open(self, ident: str) -> Device:
        if ident not in _list_serials():
            raise InputError(f"unknown iOS device 'ios:{ident}'; run 'edgekit devices' to list them")
        return IOSDevice(ident)
