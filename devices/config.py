"""The SSH hosts edgekit knows: a small JSON file under edgekit's home (``devices.json``).

    edgekit devices add ssh:jetson --host 10.0.0.5 --user me --key ~/.ssh/id_ed25519

A hand-edited file may hold a damaged entry: that board is listed as invalid with the reason, and the
other boards keep working. Damage to the file's structure (not JSON, not an object of boards) is one
:class:`CorruptFileError` naming the file.
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


def check_host(host: object) -> str:
    """A host name or address alone: no login name, port, brackets or spaces (those have their options)."""
    if not isinstance(host, str) or not host.strip():
        raise InputError("an SSH host needs --host (a name or address)")
    if "@" in host or host.count(":") == 1 or host.startswith("[") or any(c.isspace() for c in host):
        raise InputError(f"--host {host!r} must be only a host name or address: give the login name with "
                         "--user and the port with --port (e.g. --host 10.0.0.5 --user me --port 2222)")
    return host


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
        if not isinstance(self.name, str) or not _NAME_RE.match(self.name):
            raise InputError(f"SSH host name {self.name!r} must be letters, digits, '.', '_' or '-'")
        check_host(self.host)
        if isinstance(self.port, bool) or not isinstance(self.port, int) or not 0 < self.port < 65536:
            raise InputError(f"--port {self.port!r} is not a TCP port (1-65535)")
        for f in ("user", "key", "remote_edgekit", "dest"):
            if not isinstance(getattr(self, f), str | None):
                raise InputError(f"{f} {getattr(self, f)!r} must be text")
        timeout = self.connect_timeout
        if isinstance(timeout, bool) or not isinstance(timeout, int | float) or not timeout > 0:
            raise InputError(f"connect_timeout {timeout!r} must be a number of seconds above 0")

    def login(self) -> str:
        return f"{self.user + '@' if self.user else ''}{self.host}:{self.port}"


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
    if not isinstance(data, dict) or not isinstance(data.setdefault("ssh", {}), dict):
        what = "an object" if not isinstance(data, dict) else "its \"ssh\" entry an object of boards by name"
        raise CorruptFileError(f"{path} is damaged ({what} was expected); fix it by hand, or delete it and re-add "
                               "your boards with 'edgekit devices add ssh:NAME --host HOST'")
    return data


def _host(name: str, entry: object) -> SSHHost:
    if not isinstance(entry, dict):
        raise InputError(f"its entry is {type(entry).__name__}, not an object of settings")
    if "host" not in entry:
        raise InputError('it has no "host"')
    known = {f.name for f in fields(SSHHost)}
    return SSHHost(**{k: v for k, v in entry.items() if k in known} | {"name": name})


def ssh_entries() -> list[tuple[str, SSHHost | str]]:
    """Every board of devices.json in the file's order: its :class:`SSHHost`, or for a damaged entry (a
    hand edit) one line saying what is wrong and how to fix it (without the board's id)."""
    import shlex

    entries: list[tuple[str, SSHHost | str]] = []
    for name, entry in _read()["ssh"].items():
        try:
            entries.append((name, _host(name, entry)))
        except InputError as exc:
            entries.append((name, f"invalid entry in {config_path()}: {exc}; fix it there, or remove it with "
                                  f"'edgekit devices remove {shlex.quote(f'ssh:{name}')}'"))
    return entries


def load_ssh_hosts_and_errors() -> tuple[dict[str, SSHHost], dict[str, str]]:
    """The healthy boards, and what is wrong with each damaged entry."""
    entries = ssh_entries()
    return ({n: e for n, e in entries if isinstance(e, SSHHost)}, {n: e for n, e in entries if isinstance(e, str)})


def load_ssh_hosts() -> dict[str, SSHHost]:
    return load_ssh_hosts_and_errors()[0]


def get_ssh_host(name: str) -> SSHHost:
    hosts, bad = load_ssh_hosts_and_errors()
    if name in bad:
        raise InputError(f"ssh:{name}: {bad[name]}")
    if name not in hosts:
        known = ", ".join(f"ssh:{n}" for n in hosts) or "none yet"
        raise InputError(f"unknown SSH device 'ssh:{name}' (known: {known}); add it with "
                         f"'edgekit devices add ssh:{name} --host HOST --user USER --key KEY'")
    return hosts[name]


def add_ssh_host(host: SSHHost) -> SSHHost | None:
    """Save ``host``; returns the board it replaced under that name (None when it is new)."""
    data = _read()
    old = None
    if host.name in data["ssh"]:
        try:
            old = _host(host.name, data["ssh"][host.name])
        except InputError:
            old = None
    data["ssh"][host.name] = {k: v for k, v in asdict(host).items() if k != "name"}
    edgekit_home(create=True)
    with atomic_file(config_path()) as tmp:
        tmp.write_text(json.dumps(data, indent=2, sort_keys=True))
    return old


def remove_ssh_host(name: str) -> None:
    data = _read()
    if name not in data["ssh"]:
        raise InputError(f"no SSH device 'ssh:{name}' to remove; 'edgekit devices' lists them")
    del data["ssh"][name]
    edgekit_home(create=True)
    with atomic_file(config_path()) as tmp:
        tmp.write_text(json.dumps(data, indent=2, sort_keys=True))
