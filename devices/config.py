"""The SSH hosts edgekit knows: a small JSON file under edgekit's home (``devices.json``).

    edgekit devices add ssh:jetson --host 10.0.0.5 --user me --key ~/.ssh/id_ed25519
"""

from __future__ import annotations

import json
import re
from dataclasses import asdict, dataclass, fields
from pathlib import Path

from edgekit.errors import CorruptFileError, InputError
from edgekit.fsutil import atomic_file, edgekit_home

CONFIG_NAME = "devices.json"
_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")


@dataclass(frozen=True)
class SSHHost:
    """One SSH board.

    name: what follows ``ssh:`` in device ids. host/port/user: where to log in. key: private key file
    (None: the SSH agent and ~/.ssh defaults). remote_edgekit: the edgekit executable on the board, for
    ``edgekit profile --device`` (None: ``edgekit`` on the remote PATH). dest: default push folder.
    """

    name: str
    host: str
    port: int = 22
    user: str | None = None
    key: str | None = None
    remote_edgekit: str | None = None
    dest: str | None = None
    connect_timeout: float = 10.0

    def __post_init__(self) -> None:
        if not _NAME_RE.match(self.name):
            raise InputError(f"SSH host name {self.name!r} must be letters, digits, '.', '_' or '-'")
        if not self.host:
            raise InputError("an SSH host needs --host (a name or address)")
        if not 0 < int(self.port) < 65536:
            raise InputError(f"--port {self.port} is not a TCP port (1-65535)")


def config_path() -> Path:
    return edgekit_home() / CONFIG_NAME


def _read() -> dict:
    path = config_path()
    if not path.exists():
        return {"ssh": {}}
    try:
        data = json.loads(path.read_text())
    except (ValueError, OSError) as exc:
        raise CorruptFileError(f"{path} is not valid JSON ({exc}); fix or delete it and re-add your hosts") from exc
    data.setdefault("ssh", {})
    return data


def load_ssh_hosts() -> dict[str, SSHHost]:
    known = {f.name for f in fields(SSHHost)}
    return {name: SSHHost(**{k: v for k, v in entry.items() if k in known} | {"name": name})
            for name, entry in _read()["ssh"].items()}


def get_ssh_host(name: str) -> SSHHost:
    hosts = load_ssh_hosts()
    if name not in hosts:
        known = ", ".join(f"ssh:{n}" for n in hosts) or "none yet"
        raise InputError(f"unknown SSH device 'ssh:{name}' (known: {known}); add it with "
                         f"'edgekit devices add ssh:{name} --host HOST --user USER --key KEY'")
    return hosts[name]


def add_ssh_host(host: SSHHost) -> None:
    data = _read()
    data["ssh"][host.name] = {k: v for k, v in asdict(host).items() if k != "name"}
    with atomic_file(config_path()) as tmp:
        tmp.write_text(json.dumps(data, indent=2, sort_keys=True))


def remove_ssh_host(name: str) -> None:
    data = _read()
    if name not in data["ssh"]:
        raise InputError(f"no SSH device 'ssh:{name}' to remove; 'edgekit devices' lists them")
    del data["ssh"][name]
    with atomic_file(config_path()) as tmp:
        tmp.write_text(json.dumps(data, indent=2, sort_keys=True))
