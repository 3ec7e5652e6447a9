"""Ctrl-C (and the CLI's SIGTERM) gets out of coremltools: its bare ``except:`` clauses can swallow the
KeyboardInterrupt, and the convert must still end at once, saying so, with nothing kept."""

from __future__ import annotations

import os
import signal
import threading
import time

import pytest

pytest.importorskip("coremltools")


@pytest.fixture(autouse=True)
def _ctrl_c_raises():
    """Python's own Ctrl-C handler for each test: a suite started in the background (``cmd &``, nohup) inherits
    SIGINT ignored, and an ignored signal is one edgekit rightly leaves alone."""
    before = signal.signal(signal.SIGINT, signal.default_int_handler)
    yield
    signal.signal(signal.SIGINT, before)


def _resenders() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name == "edgekit-coreml-interrupt"]


def _swallow_one(signum: int) -> None:
    """What coremltools' bare ``except:`` does to a signal that lands inside it."""
    try:
        os.kill(os.getpid(), signum)
        time.sleep(5)  # the handler raises here
    except BaseException:  # noqa: BLE001
        pass


def test_an_interrupt_swallowed_everywhere_is_raised_when_the_call_returns():
    from edgekit.converters.formats.coreml.package import interruptible

    swallowed = []

    def swallows_everything() -> str:
        end = time.monotonic() + 0.6
        while time.monotonic() < end:
            try:
                if not swallowed:
                    os.kill(os.getpid(), signal.SIGINT)
                time.sleep(0.01)
            except BaseException as exc:  # noqa: BLE001
                swallowed.append(exc)
        return "done"

    with pytest.raises(KeyboardInterrupt):
        interruptible(swallows_everything)
    assert len(swallowed) >= 2  # the first, and the ones delivered again while it ran on
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler and not _resenders()


def test_an_interrupt_swallowed_once_gets_out_at_once():
    from edgekit.converters.formats.coreml.package import interruptible

    reached = []

    def swallows_once_then_works() -> None:
        _swallow_one(signal.SIGINT)
        t0 = time.monotonic()
        while time.monotonic() - t0 < 10:  # coremltools working on (Python code, between the bare excepts)
            sum(range(1000))
        reached.append("end")

    t0 = time.monotonic()
    with pytest.raises(KeyboardInterrupt):
        interruptible(swallows_once_then_works)
    assert time.monotonic() - t0 < 2 and not reached
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler and not _resenders()


def test_an_interrupt_turned_into_another_error_is_said_as_the_interrupt():
    from edgekit.converters.formats.coreml.package import interruptible

    def turns_it_into_a_value_error() -> None:
        try:
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(5)
        except:  # noqa: E722  (coremltools' type_tensor: ``except: raise ValueError(...)``)
            raise ValueError("tensor value type should be compatible with type np.ndarray") from None

    with pytest.raises(KeyboardInterrupt):
        interruptible(turns_it_into_a_value_error)


def test_without_an_interrupt_it_is_a_plain_call():
    from edgekit.converters.formats.coreml.package import interruptible

    assert interruptible(lambda a, b=0: a + b, 2, b=3) == 5
    with pytest.raises(ZeroDivisionError):
        interruptible(lambda: 1 / 0)
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler


@pytest.mark.parametrize(("signame", "code", "line"), [
    ("SIGINT", 130, "error: interrupted; nothing half-written was kept"),
    ("SIGTERM", 143, "terminated (SIGTERM); nothing half-written was kept"),
])
@pytest.mark.parametrize("where", ["convert", "save"])
def test_a_swallowed_signal_ends_the_convert_with_nothing_kept(signame, code, line, where, tiny_llama, tmp_path,
                                                               monkeypatch):
    import tempfile

    from typer.testing import CliRunner

    from edgekit.cli.main import app
    from edgekit.cli.process import unwind_on_signals
    from edgekit.converters.formats.coreml.package import coremltools

    signum = getattr(signal, signame)
    ct = coremltools()
    tmpd = tmp_path / "tmpd"
    tmpd.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(tmpd))
    before = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGHUP)}
    unwind_on_signals()  # what `edgekit` (edgekit.cli.process.run) sets up: SIGTERM unwinds like Ctrl-C
    try:
        if where == "convert":
            real = ct.convert

            def convert(*a, **k):
                _swallow_one(signum)
                return real(*a, **k)

            monkeypatch.setattr(ct, "convert", convert)
        else:
            real_save = ct.models.MLModel.save

            def save(self, path):
                _swallow_one(signum)
                return real_save(self, path)

            monkeypatch.setattr(ct.models.MLModel, "save", save)
        out = tmp_path / "cm" / "out"
        r = CliRunner().invoke(app, ["convert", str(tiny_llama), "--to", "coreml", "--bits", "8", "-o", str(out)])
    finally:
        for s, h in before.items():
            signal.signal(s, h)
    assert r.exit_code == code, r.output
    assert line in r.output and "wrote" not in r.output
    assert list((tmp_path / "cm").iterdir()) == [] and list(tmpd.iterdir()) == []
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler and not _resenders()
