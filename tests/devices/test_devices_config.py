"""`edgekit devices add/remove` and devices.json (QA s48): key files, host spellings, hand-edited entries,
the listing's ids, and `--dest ~/...` that the local shell expanded."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from edgekit.cli.main import app
from edgekit.devices.config import SSHHost, add_ssh_host, config_path
from tests.devices.test_ssh import _add

runner = CliRunner()
README = Path(__file__).resolve().parents[2] / "README.md"


def _one_error_line(r, code: int) -> str:
    assert r.exit_code == code, r.output
    assert r.output.startswith("error:") and len(r.output.strip().splitlines()) == 1, r.output
    assert "Traceback" not in r.output and "internal error" not in r.output, r.output
    return " ".join(r.output.split())


def test_add_refuses_a_missing_key_file_and_stores_an_absolute_one(home, tmp_path, monkeypatch):
    text = _one_error_line(runner.invoke(app, ["devices", "add", "ssh:nokey", "--host", "127.0.0.1", "--key",
                                               "/nonexistent/key"]), 2)
    assert "--key /nonexistent/key: no such file" in text, text
    assert not config_path().exists()
    (tmp_path / "relkey").write_text("key")
    monkeypatch.chdir(tmp_path)
    r = runner.invoke(app, ["devices", "add", "ssh:rel", "--host", "127.0.0.1", "--key", "relkey"])
    assert r.exit_code == 0, r.output
    assert json.loads(config_path().read_text())["ssh"]["rel"]["key"] == str(tmp_path / "relkey")


def test_a_key_file_gone_at_connect_time_says_so(home, tiny_artifact):
    add_ssh_host(SSHHost(name="lost", host="127.0.0.1", port=22, user="me", key="/nonexistent/key"))
    text = _one_error_line(runner.invoke(app, ["push", str(tiny_artifact), "ssh:lost", "--dry-run"]), 2)
    assert "the key file /nonexistent/key of ssh:lost does not exist" in text, text
    assert "edgekit devices add ssh:lost --host 127.0.0.1 --port 22 --user me --key" in text, text
    assert "sshd running" not in text


@pytest.mark.parametrize("host", [" ", "a b", "me@127.0.0.1", "127.0.0.1:22", "me@127.0.0.1:22", "[::1]"])
def test_host_with_a_user_port_or_space_is_refused(home, host):
    text = _one_error_line(runner.invoke(app, ["devices", "add", "ssh:b", "--host", host]), 2)
    assert "--user" in text or "needs --host" in text, text
    assert not config_path().exists()


def test_an_ipv6_address_is_a_host(home):
    r = runner.invoke(app, ["devices", "add", "ssh:six", "--host", "::1", "--port", "2222"])
    assert r.exit_code == 0 and "ssh:six (::1:2222)" in " ".join(r.output.split()), r.output


def test_add_says_what_it_updated_and_remove_names_the_board(home):
    r = runner.invoke(app, ["devices", "add", "ssh:jet", "--host", "10.0.0.5", "--user", "me"])
    assert r.exit_code == 0 and r.output.startswith("added ssh:jet (me@10.0.0.5:22)"), r.output
    r = runner.invoke(app, ["devices", "add", "ssh:jet", "--host", "10.0.0.6", "--user", "me"])
    text = " ".join(r.output.split())
    assert r.exit_code == 0 and text.startswith("updated ssh:jet to me@10.0.0.6:22 (was me@10.0.0.5:22)"), text
    for name in ("jet",):  # the bare name, as the QA typed it
        r = runner.invoke(app, ["devices", "remove", name])
        assert r.exit_code == 0 and r.output.strip() == "removed ssh:jet", r.output
    text = _one_error_line(runner.invoke(app, ["devices", "remove", "android:x"]), 2)
    assert "only SSH boards (ssh:NAME) are removed by hand" in text and "ssh:android" not in text, text


@pytest.mark.parametrize("content", ["[]", '{"ssh": [1, 2]}', '{"ssh": "x"}', "3"])
def test_a_damaged_devices_file_is_one_corrupt_file_line(home, tiny_artifact, content):
    home.mkdir(parents=True, exist_ok=True)
    config_path().write_text(content)
    for args in (["devices", "-p", "ssh"], ["push", str(tiny_artifact), "ssh:b1"], ["devices", "add", "ssh:n",
                                                                                     "--host", "h"]):
        text = _one_error_line(runner.invoke(app, args), 3)
        assert f"{config_path()} is damaged" in text and "delete it and re-add" in text, text
    assert config_path().read_text() == content  # not rewritten


@pytest.mark.parametrize("name,entry,why", [
    ("bad", {"host": "127.0.0.1", "port": "abc"}, "--port 'abc' is not a TCP port"),
    ("a", "b", "its entry is str"),
    ("x y", {"host": "127.0.0.1"}, "must be letters, digits"),
    ("nohost", {"port": 22}, 'it has no "host"'),
    ("t", {"host": "h", "connect_timeout": "soon"}, "connect_timeout 'soon'"),
])
def test_one_bad_entry_does_not_stop_the_healthy_boards(sshd, home, tiny_artifact, tmp_path, name, entry, why):
    """A hand-edited entry that is wrong is listed as invalid with its fix (exit 0); the other boards are
    listed and pushed to as before; using the bad one is one line naming the file."""
    good = _add(sshd)
    data = json.loads(config_path().read_text())
    data["ssh"][name] = entry
    config_path().write_text(json.dumps(data))
    r = runner.invoke(app, ["devices", "--json", "-p", "ssh"])
    assert r.exit_code == 0, r.output
    devs = {d["id"]: d for d in json.loads(r.output)["devices"]}
    assert devs[good]["state"] == "ready"
    bad = devs[f"ssh:{name}"]
    assert bad["state"] == "invalid" and why in bad["detail"] and str(config_path()) in bad["detail"], bad
    assert "edgekit devices remove" in bad["detail"]
    r = runner.invoke(app, ["push", str(tiny_artifact), good, "--dest", str(tmp_path / "b")])
    assert r.exit_code == 0, r.output
    text = _one_error_line(runner.invoke(app, ["push", str(tiny_artifact), f"ssh:{name}"]), 2)
    assert why in text and str(config_path()) in text, text
    r = runner.invoke(app, ["devices", "remove", f"ssh:{name}"])  # the fix it names works
    assert r.exit_code == 0 and name not in json.loads(config_path().read_text())["ssh"], r.output


def test_listing_shows_whole_ids_when_stdout_is_not_a_terminal(home):
    """Piped (80 columns), the ids were cut to `ssh:S…`: they are what one copies from the table."""
    names = [f"a-rather-long-board-name-{i}" for i in range(2)]
    for name in names:
        add_ssh_host(SSHHost(name=name, host="127.0.0.1", port=1, user="someone", connect_timeout=2))
    r = runner.invoke(app, ["devices", "-p", "ssh"])
    assert r.exit_code == 0, r.output
    rows = [line for line in r.output.splitlines() if "unreachable" in line]
    assert len(rows) == 2 and all(f"ssh:{n}" in row for n, row in zip(names, rows, strict=True)), r.output


def test_an_unquoted_tilde_in_dest_is_pointed_out(sshd, home, tiny_artifact, tmp_path, monkeypatch):
    """`--dest ~/models` reaches edgekit as this machine's home: a board's home is another folder."""
    me = tmp_path / "me"
    monkeypatch.setenv("HOME", str(me))
    dev = _add(sshd)
    r = runner.invoke(app, ["push", str(tiny_artifact), dev, "--dest", f"{me}/models", "--dry-run"])
    assert r.exit_code == 0, r.output
    text = " ".join(r.output.split())
    assert "note: --dest" in text and "your shell expanded ~ here" in text and "--dest '~/models'" in text, text
    r = runner.invoke(app, ["push", str(tiny_artifact), "host", "--dest", f"{me}/models", "--dry-run"])
    assert r.exit_code == 0 and "note:" not in r.output, r.output
    r = runner.invoke(app, ["push", "--help"])
    assert "--dest '~/models'" in r.output, r.output
    assert "--dest ~/" not in README.read_text()
