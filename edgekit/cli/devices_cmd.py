"""``edgekit devices`` (list, add, remove, show) and ``edgekit push``.

The device layer (adbutils, paramiko, pymobiledevice3) is imported inside the commands.
"""

from __future__ import annotations

from pathlib import Path

import typer

from edgekit.cli.ui import (
    Terminated,
    err,
    handle_errors,
    out,
    print_json,
    progress_bar,
    progress_unless_piped,
    say,
)

devices_app = typer.Typer(help="This host, Android phones (adb), iPhones (usbmuxd) and SSH boards.",
                          invoke_without_command=True, no_args_is_help=False)


def _gb(n: int | None) -> str:
    return "-" if n is None else f"{n / 2**30:.1f}"


def _render(found) -> None:
    from rich.table import Table
    from rich.text import Text

    table = Table(title="devices")
    for col in ("id", "state", "model", "os", "arch", "cores", "RAM GiB", "free GiB", "GPUs"):
        table.add_column(col, justify="right" if col in ("cores", "RAM GiB", "free GiB") else "left",
                         no_wrap=col == "id")
    for d in found.devices:
        gpus = ", ".join(f"{g.name} ({_gb(g.vram_total)} GiB)" for g in d.gpus) or "-"
        # what devices report about themselves is data: Text cells, never markup
        table.add_row(Text(d.id), Text(d.state, style="" if d.state == "ready" else "yellow"), Text(d.model or "-"),
                      Text(" ".join(filter(None, (d.os, d.os_version))) or "-"), Text(d.abi or d.arch or "-"),
                      str(d.cores or "-"), _gb(d.ram_total), _gb(d.storage_free), Text(gpus))
    if out.is_terminal:
        out.print(table)
    else:  # piped, the table keeps its natural width: ids cut to "ssh:S…" could not be copied from it
        from rich.console import Console

        natural = out.measure(table, options=out.options.update_width(4000)).maximum
        Console(file=out.file, width=max(out.width, natural)).print(table)
    for d in found.devices:
        if d.detail:
            say(out, str(d.detail), f"{d.id}:", "yellow")
    for platform, note in found.notes.items():
        say(out, Text(f"{platform}: {note}", style="dim"))


@devices_app.callback()
@handle_errors
def devices(
    ctx: typer.Context,
    platform: list[str] = typer.Option([], "--platform", "-p", help="Only these: host, android, ios, ssh."),
    as_json: bool = typer.Option(False, "--json", help="Print the devices as JSON."),
) -> None:
    """List this host and every device edgekit can reach.

    Examples:
      edgekit devices
      edgekit devices --json
      edgekit devices add ssh:jetson --host 10.0.0.5 --user me --key ~/.ssh/id_ed25519
    """
    if ctx.invoked_subcommand is not None:
        return
    from edgekit.devices import list_devices

    found = list_devices(platform or None)
    if as_json:
        print_json(found.to_json())
    else:
        _render(found)


@devices_app.command("add")
@handle_errors
def add(
    device: str = typer.Argument(..., help="ssh:NAME, the id the board will have."),
    host: str = typer.Option(..., "--host", help="Host name or address."),
    port: int = typer.Option(22, "--port"),
    user: str | None = typer.Option(None, "--user", "-u"),
    key: str | None = typer.Option(None, "--key", "-i", help="Private key file (default: agent and ~/.ssh)."),
    remote_edgekit: str | None = typer.Option(None, "--remote-edgekit", help="edgekit on the board, for profiling."),
    dest: str | None = typer.Option(None, "--dest", help="Default push folder on the board (default ~/edgekit)."),
) -> None:
    """Remember an SSH board (Jetson, Raspberry Pi...) as ssh:NAME."""
    from edgekit.devices.config import SSHHost, add_ssh_host, config_path
    from edgekit.devices.transfer import check_dest
    from edgekit.errors import InputError

    kind, _, name = device.partition(":")
    if kind != "ssh" or not name:
        raise InputError(f"{device!r}: only SSH boards are added by hand, as ssh:NAME (adb and usbmuxd find the rest)")
    if dest is not None:
        check_dest(dest)
    if key is not None:
        key_path = Path(key).expanduser()
        if not key_path.is_file():
            raise InputError(f"--key {key}: no such file here; give the private key file this machine logs in with "
                             "(e.g. ~/.ssh/id_ed25519), or leave --key out to use the SSH agent and ~/.ssh")
        key = str(key_path.absolute())  # the same file whatever folder later commands run in
    board = SSHHost(name=name, host=host, port=port, user=user, key=key, remote_edgekit=remote_edgekit, dest=dest)
    old = add_ssh_host(board)
    if old is None:
        say(out, f"ssh:{name} ({_login(board)}) to {config_path()}", "added", "green")
    else:
        say(out, f"ssh:{name} to {_login(board)} (was {_login(old)}) in {config_path()}", "updated", "green")


def _login(h) -> str:
    return h.login() + (f", key {h.key}" if h.key else "")


@devices_app.command("remove")
@handle_errors
def remove(device: str = typer.Argument(..., help="ssh:NAME")) -> None:
    """Forget an SSH board."""
    from edgekit.devices.config import remove_ssh_host
    from edgekit.errors import InputError

    kind, sep, name = device.partition(":")
    if not sep:
        kind, name = "ssh", device
    if kind != "ssh" or not name:
        raise InputError(f"{device!r}: only SSH boards (ssh:NAME) are removed by hand; Android phones and iPhones "
                         "leave the list when they are unplugged (or 'adb disconnect HOST:PORT')")
    remove_ssh_host(name)
    say(out, f"ssh:{name}", "removed", "green")


@devices_app.command("show")
@handle_errors
def show(device: str = typer.Argument(..., help="host, android:SERIAL, ios:UDID or ssh:NAME")) -> None:
    """Everything edgekit knows about one device, as JSON."""
    from edgekit.devices import open_device

    with open_device(device) as dev:
        print_json(dev.info().to_json())


@handle_errors
def push(
    artifact: Path = typer.Argument(..., help="Artifact folder (or a .gguf file)."),
    device: str = typer.Argument(..., help="host, android:SERIAL, ssh:NAME (see 'edgekit devices')."),
    dest: str | None = typer.Option(None, "--dest", help="Folder on the device (Android: /data/local/tmp/edgekit, "
                                    "SSH: ~/edgekit)."),
    name: str | None = typer.Option(None, "--name", help="Folder name under --dest (default: the artifact's)."),
    ctx: int = typer.Option(4096, "--ctx", "-c", help="Context length the RAM check assumes."),
    ram_check: bool = typer.Option(True, "--ram-check/--no-ram-check", help="Refuse if it cannot run in the "
                                   "device's RAM at --ctx."),
    dry_run: bool = typer.Option(False, "--dry-run", help="Check fit and show the plan; send nothing."),
    as_json: bool = typer.Option(False, "--json", help="Print the result (files, bytes sent, fit) as JSON."),
) -> None:
    """Copy an artifact to a device: checks fit, resumes, verifies sha256 there, never leaves half files.

    Examples:
      edgekit push ./model-gguf-q4 android:R58M12345
      edgekit push ./model-gguf-q4 ssh:jetson --dest '~/models'
      edgekit push ./model-gguf-q4 ssh:jetson --dry-run
    """
    from edgekit.devices import PushConfig, open_device
    from edgekit.devices import push as do_push

    cfg = PushConfig(dest=dest, name=name, ctx=ctx, check_ram=ram_check, dry_run=dry_run)
    _note_local_home(device, dest)
    try:
        with open_device(device) as dev, progress_bar(progress_unless_piped(as_json) and not dry_run) as progress:
            res = do_push(artifact, dev, cfg, progress=progress)
    except Terminated as exc:  # `kill` or a closed terminal (exit 143 / 129): handle_errors says what was kept
        if not getattr(exc, "__notes__", None):
            exc.add_note("the device is as it was")
        raise
    if as_json:
        print_json(res.to_json())
        return
    verb = "would send" if res.dry_run else "sent"
    for f in res.files:
        state = ("already there (sha256 matches)" if f.skipped else
                 f"resumed at {f.resumed_from / 1e6:.1f} MB" if f.resumed_from else
                 "new, made by the push (no edgekit.json beside the model here)" if f.made else "new")
        say(out, f"  {f.name:<32} {f.size / 1e6:9.1f} MB  {state}")
    fit = res.fit
    ram = f", needs ~{fit.ram_needed / 1e6:.0f} MB RAM at ctx {fit.ctx} of {_gb(fit.ram_total)} GiB" \
        if fit and fit.ram_needed and fit.ram_total else ""
    sent = sum(f.size - f.resumed_from for f in res.files if not f.skipped) if res.dry_run else res.bytes_sent
    speed = f" in {res.seconds:.1f} s ({res.bytes_sent / 1e6 / res.seconds:.1f} MB/s)" if res.seconds > 0 else ""
    say(out, f"{sent / 1e6:.1f} MB to {res.device_id}:{res.remote_dir}{speed}{ram}"
        + ("" if res.dry_run else "; sha256 verified on the device"), verb, "green")


def _note_local_home(device: str, dest: str | None) -> None:
    """`--dest ~/models` unquoted: the shell put this machine's home there, which the board does not have."""
    home = str(Path.home()).rstrip("/")
    if dest and home and device.split(":")[0].lower() != "host" and dest.startswith(home + "/"):
        rest = dest[len(home) + 1:]
        say(err, f"--dest {dest} is under this machine's home folder: your shell expanded ~ here; for the "
                 f"board's home quote it: --dest '~/{rest}'", "note:", "yellow")


def register(app: typer.Typer) -> None:
    """Add ``devices`` (a group) and ``push`` to the main app."""
    app.add_typer(devices_app, name="devices")
    app.command("push")(push)
