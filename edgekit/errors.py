"""One family of errors. Each message names what was wrong and what to do about it.

Only the CLI turns these into exit codes; the SDK raises them.
"""

from __future__ import annotations

import sys
import warnings


class EdgekitError(Exception):
    """Base of every error edgekit raises on purpose. ``str(err)`` is a one-line message with the fix."""

    exit_code = 1


class InputError(EdgekitError):
    """A path or argument the user gave is missing, malformed or of the wrong kind."""

    exit_code = 2


class UnsupportedError(EdgekitError):
    """An architecture, type, format or option edgekit does not handle."""

    exit_code = 2


class CorruptFileError(EdgekitError):
    """A model file exists but cannot be read: truncated, corrupt or not what its name says."""

    exit_code = 3


class OutputExistsError(EdgekitError):
    """The output already exists and ``--force`` was not given."""

    exit_code = 2


class DiskFullError(EdgekitError):
    """Not enough free space to write the output."""

    exit_code = 4


class MissingDependencyError(EdgekitError):
    """An optional Python package needed for this step is not installed."""

    exit_code = 5


class BackendError(EdgekitError):
    """A runtime backend failed to load or run an artifact."""

    exit_code = 6


class BackendCrashed(BackendError):
    """The native runtime died (a signal, not an exception); the CLI survives and reports it.

    ``signal``: the signal's name (``"SIGILL"``), when one killed it."""

    exit_code = 7
    signal: str | None = None


class EdgekitWarning(UserWarning, RuntimeWarning):
    """A notice edgekit gives the user (the CPUs are busy, a result was not recorded): shown like any warning
    and silenced by an ``ignore`` filter, but never raised by an ``error`` one (``python -W error``,
    ``PYTHONWARNINGS=error``, pytest's ``-W error``): a note about the work must not abort the work. A
    UserWarning and a RuntimeWarning, as these notes were before, so filters that name either still apply."""


def notice(message: str, stacklevel: int = 1) -> None:
    """Warn the user with ``message``, an :class:`EdgekitWarning` attributed ``stacklevel`` frames up (1: the
    caller). Where the warning filters would raise it, it is shown instead (through ``warnings.showwarning``,
    which the CLI prints as one line)."""
    try:
        warnings.warn(message, EdgekitWarning, stacklevel=stacklevel + 1)
    except EdgekitWarning:
        try:
            frame = sys._getframe(stacklevel)
            where, line = frame.f_code.co_filename, frame.f_lineno
        except ValueError:  # fewer frames than stacklevel: as warnings.warn does
            where, line = "sys", 1
        warnings.showwarning(EdgekitWarning(message), EdgekitWarning, where, line)


def require(module: str, extra: str) -> object:
    """Import ``module`` or raise a :class:`MissingDependencyError` that says how to install it."""
    import importlib

    try:
        return importlib.import_module(module)
    except ImportError as exc:  # pragma: no cover - depends on the environment
        raise MissingDependencyError(
            f"{module} is not installed (needed for {extra}); install it with: pip install 'edgekit[{extra}]'"
        ) from exc


class quiet_transformers:  # lower-case: used as a function is, ``with quiet_transformers(transformers):``
    """Within the block, transformers logs only errors and neither it nor huggingface_hub draws a progress
    bar: edgekit shows its own progress. Both libraries' settings are process-wide, so the caller's (a host
    application's own logging and bars) come back when the block ends. A class, not a generator: contextlib
    would weigh on ``import edgekit``."""

    def __init__(self, transformers: object) -> None:
        self._utils = transformers.utils.logging  # type: ignore[attr-defined]

    def __enter__(self) -> None:
        import logging

        self._logger = logging.getLogger("transformers")  # the library's root logger: what set_verbosity sets
        self._level, self._bars = self._logger.level, self._utils.is_progress_bar_enabled()
        self._hub = _hub_bar_states()
        self._saved_hub = dict(self._hub) if self._hub is not None else {}
        self._utils.disable_progress_bar()
        self._utils.set_verbosity_error()

    def __exit__(self, *exc: object) -> None:
        self._logger.setLevel(self._level)
        if self._bars:
            self._utils.enable_progress_bar()
        if self._hub is not None:  # the hub's switches, global and by group, as they were
            self._hub.clear()
            self._hub.update(self._saved_hub)


def _hub_bar_states() -> dict[str, bool] | None:
    """huggingface_hub's progress-bar switches (global and by group), or None where it keeps none."""
    import importlib

    try:  # the module: the package's ``tqdm`` attribute is its tqdm class
        hub_tqdm = importlib.import_module("huggingface_hub.utils.tqdm")
    except ImportError:
        return None
    states = getattr(hub_tqdm, "progress_bar_states", None)
    return states if isinstance(states, dict) else None
