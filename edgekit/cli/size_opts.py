"""``convert --size`` and ``convert --fit DEVICE [--ctx N]``: size-first conversion targets.

``--size 90MB`` is a size budget for the model files; ``--fit`` derives one from a device's RAM (through
the runtime's memory model at ``--ctx``) and free storage, then checks the written artifact against it.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from edgekit.cli.ui import err, say, tagged
from edgekit.errors import InputError

SIZE_HELP = ("Size budget for the model files (90MB, 1.5GB, 512MiB): types per tensor by measured sensitivity "
             "(GGUF, ONNX).")
FIT_HELP = ("Size the artifact for a device: host, android:SERIAL, ssh:NAME (see 'edgekit devices'), from its "
            "RAM at --ctx and its free storage.")
CTX_HELP = "With --fit: the context length the device must hold."


def size_target(model: Path, to: str, size: str | None, fit: str | None, ctx: int,
                quiet: bool = False) -> tuple[int | None, Any]:
    """The size budget in bytes (or None) and, with ``fit``, the :class:`FitTarget` it came from."""
    from edgekit.runtime.sizing import parse_file_size

    if size is not None and fit is not None:
        raise InputError("give --size or --fit, not both")
    if fit is None:
        return (parse_file_size(size) if size is not None else None), None
    from edgekit.devices import open_device
    from edgekit.model import HFCheckpoint
    from edgekit.runtime.sizing import fit_size

    ckpt = HFCheckpoint.open(model)
    with open_device(fit) as dev:
        info = dev.info()
    target = fit_size(ckpt.hparams, ckpt.n_params, to, info, ctx)
    if not quiet:
        say(err, tagged("fit:", "cyan", target.describe()))
    return target.size, target


def report_fit(art: Any, target: Any) -> None:
    """Say whether the written artifact fits the device, by the memory model on the real file."""
    from edgekit.runtime.sizing import check_fit

    ok, text = check_fit(art, target)
    say(err, tagged("fits:" if ok else "warning:", "green" if ok else "yellow",
                    text if ok else f"{text}: it may not fit; lower --ctx or give a smaller --size"))


@contextlib.contextmanager
def explain_fit(target: Any) -> Iterator[None]:
    """A ``--fit`` budget below the smallest file the model allows: say what the device leaves and what to
    change (the context), not to raise a ``--size`` the user never gave."""
    try:
        yield
    except InputError as exc:
        text = str(exc)
        if target is None or "below the smallest file" not in text:
            raise
        smallest = text.split("possible here", 1)[-1].split(";", 1)[0].strip()
        raise InputError(f"{target.device} leaves {target.weight_room / 1e6:,.0f} MB for weights at context "
                         f"{target.n_ctx}, less than the smallest file of this model {smallest}; lower --ctx or "
                         "free memory on the device") from None
