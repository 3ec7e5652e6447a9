"""The model library on the command line: ``ls``, ``show``, ``rm``, ``ps``; ``registry`` (what ``list`` was);
``cache`` (what edgekit keeps to go faster next time, and ``cache clear``).

Artifacts are named ``<model>-<format>-<quantization>`` in the store (see :mod:`edgekit.library`); every
command that takes an artifact takes such a name as well as a path.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any

import typer

from edgekit.cli.render import tensor_type_flags, training_notes
from edgekit.cli.ui import err, handle_errors, out, print_json, print_table, say, stdin_is_tty, tagged

DIR_HELP = "Model library folder (default: $EDGEKIT_MODELS, else models/ in edgekit's home)."


def _mb(n: int | None) -> str:
    return "-" if n is None else f"{n / 1e6:,.1f}"


def eval_label(e: dict[str, Any] | None, short: bool = False) -> str:
    """A recorded perplexity with what it was measured on: ``19.64 on valid.txt sha256:3f2a9c1e, 16 chunks
    x 512, ref SmolLM2-135M``; ``short``: ``19.64 valid.txt 16x512`` (a table cell)."""
    from edgekit.evaluate import diffusion_label, provenance_label, text_name

    if e and isinstance(e.get("fid"), (int, float)):  # a diffusion model's images
        return f"FID {e['fid']:.1f} {e.get('sampler', '?')} {e.get('steps', '?')}" if short else diffusion_label(e)
    if not e or not isinstance(e.get("ppl"), (int, float)):
        return "-"
    if not short:
        return f"{e['ppl']:.3f} on {provenance_label(e)}"
    name = text_name(e)
    shape = f"{e.get('tokens_scored')} tok" if e.get("kv_window") else f"{e.get('chunks', '?')}x{e.get('ctx', '?')}"
    return f"{e['ppl']:.2f} {name} {shape}"


@handle_errors
def ls(
    folder: Path | None = typer.Option(None, "--dir", help=DIR_HELP, show_default=False),
    as_json: bool = typer.Option(False, "--json", help="Print the artifacts as JSON."),
    clean: bool = typer.Option(False, "--clean", help="First delete what killed edgekit runs left in the library "
                               "(hidden .NAME.partial-PID-* folders whose process is gone; a running conversion's "
                               "is kept)."),
) -> None:
    """The artifacts in the model library: size, bits per weight, latest perplexity.

    Each row: name, format, quantization, size, bits per weight, source, and the latest perplexity with
    what it was measured on. What killed conversions left (hidden, often large) is counted after the
    table; --clean deletes it.

    Examples:
      edgekit ls
      edgekit ls --dir ./models --json
      edgekit ls --clean
    """
    from rich.table import Table
    from rich.text import Text

    from edgekit import library

    if clean:
        _clean(folder)
    found = library.entries(folder)  # their paths absolute, as the folder's below: a script can reuse them
    left = library.leftovers(folder)
    if folder is None and not os.environ.get("EDGEKIT_MODELS"):  # the library is in the home
        _warn_about_home()
    if as_json:
        print_json({"dir": str(library.store_dir(folder).resolve()), "artifacts": [e.to_json() for e in found],
                    "leftovers": [x.to_json() for x in left]})
        return
    if not found:
        say(out, f"no artifacts in {library.store_dir(folder)}; 'edgekit convert MODEL' writes one there")
        _say_leftovers(left, cleaned=clean)
        return
    table = Table(title=Text(f"{library.store_dir(folder)}"), title_justify="left")
    rows = []
    for e in found:  # names come from disk: Text, never markup
        name = Text(e.name + (f" -> {e.link}" if e.link else ""))
        if e.problem:
            name.append(" (newer edgekit)" if e.problem.startswith(library.NEWER) else " (damaged)", "bold red")
        rows.append((name, Text(e.format), Text(e.preset), Text(_mb(e.size_bytes)),
                     Text("-" if e.bpw is None else f"{e.bpw:.2f}"), Text(e.created[:10]),
                     Text(eval_label(e.eval, short=True))))
    # names, sizes and dates are never cut short, nor folded (even in a narrow terminal: the table is wider
    # then); only the last column wraps
    for i, col in enumerate(("name", "format", "quant", "MB", "bpw", "created", "perplexity on")):
        last = col == "perplexity on"
        table.add_column(col, justify="right" if col in ("MB", "bpw") else "left", no_wrap=not last,
                         min_width=None if last else max(r[i].cell_len for r in rows))
    for row in rows:
        table.add_row(*row)
    print_table(out, table)
    for e in found:
        if e.problem:
            say(err, f"{e.name}: {e.problem}", "warning:", "yellow")
    _say_leftovers(left, cleaned=clean)


def _say_leftovers(left: list[Any], cleaned: bool = False) -> None:
    """The note after ``ls``'s table: how many leftovers of killed edgekit runs the library holds, their size,
    and what deletes them (they are hidden, and a killed conversion's can be gigabytes); ``cleaned``: those
    that ``--clean`` could not delete."""
    if not left:
        return
    one = len(left) == 1
    names = ", ".join(x.path.name for x in left[:3]) + (f" and {len(left) - 3} more" if len(left) > 3 else "")
    what = (f"{'a leftover of a killed edgekit run' if one else f'{len(left)} leftovers of killed edgekit runs'} "
            f"({_mb(sum(x.size_bytes for x in left))} MB) in {left[0].path.parent}: {names}")
    if cleaned:
        say(err, f"{what} could not be deleted; delete {'it' if one else 'them'} yourself (or ask the owner to)",
            "warning:", "yellow")
    else:
        say(err, f"{what}; 'edgekit ls --clean' deletes {'it' if one else 'them'} (so does the next convert into "
                 "this library)", "note:", "dim")


def _clean(folder: Path | None) -> None:
    """``ls --clean``: delete the leftovers of killed edgekit runs in the library, saying each (on stderr, which
    a --json document never holds); a running edgekit's temporary folder is kept."""
    from edgekit import library
    from edgekit.fsutil import sweep_stale

    root = library.store_dir(folder)
    if root.is_dir():
        for line in sweep_stale(root):
            say(err, line)


@handle_errors
def show(
    artifact: str = typer.Argument(..., metavar="ART", help="Artifact name (see 'edgekit ls') or folder."),
    folder: Path | None = typer.Option(None, "--dir", help=DIR_HELP, show_default=False),
    as_json: bool = typer.Option(False, "--json", help="Print the manifest as JSON."),
) -> None:
    """One artifact: where it is, how it was made, its files and evaluations.

    Every evaluation is shown with what it was measured on. For tensors and memory: 'edgekit inspect ART'.

    Examples:
      edgekit show smollm2-135m-instruct-gguf-q4_k_m
      edgekit show ./my-artifact --json
    """
    from edgekit import library
    from edgekit.artifact import Artifact

    art = Artifact.open(library.resolve(artifact, folder))
    m = art.manifest
    if as_json:
        print_json({"path": str(art.path.resolve()), **m})
        return
    src = m.get("source") or {}
    recipe = m.get("recipe") or {}
    on_disk = library.folder_bytes(art.path)
    rows = [("path", str(art.path.resolve())), ("format", f"{m.get('format')} ({m.get('preset', '-')})"),
            ("size", f"{_mb(on_disk)} MB on disk"
                     + (f" ({_mb(model)} MB of model files, which bpw counts; the rest: tokenizer, manifest)"
                        if isinstance(model := m.get("size_bytes"), int) and on_disk > 1.005 * model else "")
                     + f", {m.get('bpw', '-')} bpw, {m.get('n_params', 0):,} parameters"),
            ("source", f"{src.get('path', '-')} ({src.get('architecture', '?')}, sha256 {str(src.get('sha256', ''))[:12]})"),
            ("recipe", ", ".join([f"{k} {v}" for k, v in recipe.items() if k in ("method", "bits", "preset", "bpw", "size",
                                                                               "prune") and v not in (None, [], "")]
                                 + tensor_type_flags(recipe) + training_notes(m))),
            ("created", f"{m.get('created', '-')} by edgekit {(m.get('tools') or {}).get('edgekit', '?')}")]
    if isinstance(m.get("budget"), dict):
        b = m["budget"]
        rows.append(("budget", f"target {b.get('bpw_target')} bpw, planned {b.get('bpw_planned')} bpw"))
    for name in sorted((m.get("files") or {}).values()):
        f = art.path / name
        rows.append(("file", f"{name} ({_mb(f.stat().st_size) if f.exists() else 'missing'} MB)"))
    if problem := library.damage(art.path, m):
        rows.append(("damaged", problem))
    for e in m.get("eval") or []:
        if isinstance(e, dict):
            rows.append(("eval", eval_label(e) + (f", measured {e['measured']}" if e.get("measured") else "")))
    width = max(len(k) for k, _ in rows)
    for key, value in rows:
        say(out, tagged(f"{key:<{width}}", "bold", value))


@handle_errors
def rm(
    artifacts: list[str] = typer.Argument(..., metavar="ART...", help="Artifact names (see 'edgekit ls') or folders.",
                                          show_default=False),
    folder: Path | None = typer.Option(None, "--dir", help=DIR_HELP, show_default=False),
    yes: bool = typer.Option(False, "--yes", "-y", help="Do not ask."),
) -> None:
    """Delete artifacts (only folders edgekit wrote; anything else is refused untouched).

    Examples:
      edgekit rm smollm2-135m-instruct-gguf-q4_k_m
      edgekit rm old-a old-b -y
    """

    from edgekit import library
    from edgekit.errors import InputError

    paths = []
    for a in artifacts:
        p = library.resolve(a, folder)
        if not (p.exists() or p.is_symlink()):
            raise InputError(f"{p} does not exist{library.not_found_hint(a, folder)}; nothing was deleted")
        library.check_removable(p)
        paths.append(p)
    for p in paths:
        seen = library.stamp(p)  # what the question describes: a folder put there meanwhile is not deleted
        link = p.is_symlink()
        size = 0 if link else library.folder_bytes(p)
        what = f"the link {p} (to {p.resolve()}, which is kept)" if link else f"{p} ({_mb(size)} MB)"
        if not yes:
            if not stdin_is_tty():
                raise InputError(f"rm asks before deleting {p}, and stdin is not a terminal: pass -y to delete "
                                 "without asking")
            if not typer.confirm(f"delete {what}?", default=False, err=True):
                say(err, f"kept {p}")
                continue
        library.remove(p, expect=seen)
        say(out, what if link else f"{p} ({_mb(size)} MB freed)", "deleted", "green")


@handle_errors
def ps(as_json: bool = typer.Option(False, "--json", help="Print the processes as JSON.")) -> None:
    """Running 'edgekit serve' servers and llama.cpp workers: pid, model, port, memory.

    Examples:
      edgekit ps
      edgekit ps --json
    """
    from rich.table import Table
    from rich.text import Text

    from edgekit.runtime.processes import running

    procs = running()
    if as_json:
        print_json([p.to_json() for p in procs])
        return
    if not procs:
        say(out, "no edgekit servers or llama.cpp workers are running")
        return
    table = Table()
    table.add_column("kind")
    table.add_column("pid", justify="right")
    table.add_column("model", no_wrap=True)
    for col in ("port", "MB"):
        table.add_column(col, justify="right")
    table.add_column("parent")
    servers = {p.pid for p in procs if p.kind == "server"}
    for p in procs:
        by = "-" if p.kind == "server" else f"server {p.parent}" if p.parent in servers else p.owner or "-"
        table.add_row(p.kind, str(p.pid), Text(", ".join(p.models) or "-"), str(p.port or "-"), _mb(p.rss), Text(by))
    print_table(out, table)


@handle_errors
def registry(as_json: bool = typer.Option(False, "--json", help="Print the registry as JSON.")) -> None:
    """What edgekit has: formats, methods, layer steps, grids, runtimes, GGUF presets.

    Runtimes are listed with what each can do. For your artifacts: 'edgekit ls'."""
    from edgekit.converters.formats.base import FORMATS
    from edgekit.converters.formats.gguf import mixes
    from edgekit.converters.quantize.base import QUANTIZERS
    from edgekit.converters.quantize.grids import GRIDS, as_grid
    from edgekit.converters.quantize.steps import STEPS
    from edgekit.runtime.base import BACKENDS, capabilities

    data = {"formats": FORMATS.names(), "methods": QUANTIZERS.names(), "steps": STEPS.names(),
            "grids": [as_grid(n).name for n in GRIDS.names()],
            "backends": {n: {"formats": list(BACKENDS.get(n).formats), "can": capabilities(BACKENDS.get(n))}
                         for n in BACKENDS.names()},
            "gguf_presets": list(mixes.PRESETS), "bits": {str(k): v for k, v in mixes.BITS_TO_PRESET.items()}}
    if as_json:
        print_json(data)
    else:
        for k, v in data.items():
            if k == "backends":
                v = ", ".join(f"{n} ({'/'.join(b['formats'])}: {', '.join(b['can']) or 'run'})" for n, b in v.items())
            elif k == "bits":  # --bits N -> the GGUF preset it picks
                v = ", ".join(f"{n} -> {preset}" for n, preset in v.items())
            say(out, tagged(f"{k}:", "bold", ", ".join(map(str, v)) if isinstance(v, list) else str(v)))


@handle_errors
def list_alias(as_json: bool = typer.Option(False, "--json", help="Print the registry as JSON.")) -> None:
    """Old name of 'edgekit registry'."""
    if not as_json:
        say(err, "'edgekit list' is 'edgekit registry' now (formats, methods, runtimes); your artifacts: "
                 "'edgekit ls'", "hint:", "cyan")
    registry(as_json=as_json)


# What edgekit keeps in its home only to go faster next time: kind, where under the home, what it holds. Never
# listed here: the library (models/, 'edgekit rm'), devices.json, known_hosts, chats/, the profile history,
# the quickstart's model, the llama.cpp builds.
CACHES = (
    ("heal", "heal", "--heal/--distill training: a stopped run resumes, a finished one is reused"),
    ("aqlm", "aqlm", "AQLM layer encodings: the same recipe skips encoding"),
    ("calib", "calib", "calibration text sampled from models, --calib self"),
    ("hashes", "sha256-cache.json", "sha256 of source weights, by path, size and time"),
)
KINDS = tuple(kind for kind, _, _ in CACHES)
# What edgekit writes in each cache folder, by name: a folder named by a hex key (heal's training state, an
# AQLM encoding), a file <hex key>.npy (calibration tokens). Anything else there is someone else's: kept.
_ENTRY = {"heal": (re.compile(r"[0-9a-f]+"), True), "aqlm": (re.compile(r"[0-9a-f]+"), True),
          "calib": (re.compile(r"[0-9a-f]+\.npy"), False)}

cache_app = typer.Typer(invoke_without_command=True, no_args_is_help=False)  # its help: cache's docstring


def _ours(kind: str, child: Path) -> bool:
    """Whether ``child`` of ``kind``'s cache folder is one of the entries edgekit writes there."""
    pattern, folder = _ENTRY[kind]
    if child.is_symlink() or not pattern.fullmatch(child.name):
        return False
    return child.is_dir() if folder else child.is_file()


def _entries(kind: str, path: Path) -> tuple[list[Path], list[Path]]:
    """The entries of one cache folder edgekit wrote, and the other things in it (never cleared); hidden
    temporary names (a live writer's, or a killed one's, which the clear sweeps) are neither."""
    ours: list[Path] = []
    others: list[Path] = []
    if path.is_symlink() or not path.is_dir():
        return ours, others
    for child in sorted(path.iterdir()):
        if not child.name.startswith("."):
            (ours if _ours(kind, child) else others).append(child)
    return ours, others


def _caches() -> list[dict[str, Any]]:
    """Each cache kind: its path, the bytes and number of its entries edgekit wrote, and ``others``: what else
    is there (someone else's, which ``cache clear`` keeps)."""
    from edgekit import library
    from edgekit.fsutil import edgekit_home

    home = edgekit_home(create=False)  # only read: never made here
    rows = []
    for kind, rel, holds in CACHES:
        path = home / rel
        if kind in _ENTRY:
            ours, others = _entries(kind, path)
            size = sum(library.folder_bytes(p) if p.is_dir() else p.stat().st_size for p in ours)
            n = len(ours)
        else:
            size, n = (path.stat().st_size, 1) if path.is_file() and not path.is_symlink() else (0, 0)
            others = []
        rows.append({"kind": kind, "path": str(path), "bytes": size, "entries": n, "holds": holds,
                     "others": [str(p) for p in others]})
    return rows


def _clear(kind: str, path: Path) -> None:
    """Empty a cache: a file goes; a folder keeps itself (a running conversion writes beside its entries), what
    a live edgekit is writing there (hidden temporary names) and what edgekit did not write, and loses its
    entries."""
    import shutil

    from edgekit.fsutil import sweep_stale

    if path.is_symlink() or not path.exists():
        return
    if path.is_file():
        path.unlink()
        return
    sweep_stale(path)  # what killed writers left
    for child in _entries(kind, path)[0]:
        if child.is_dir():
            shutil.rmtree(child)
        else:
            child.unlink()


def _warn_about_home() -> None:
    """A home that can be no folder (EDGEKIT_HOME set to a file): said, where a command that only reads goes on."""
    from edgekit.fsutil import home_problem

    if problem := home_problem():
        say(err, problem, "warning:", "yellow")


@cache_app.callback()
@handle_errors
def cache(
    ctx: typer.Context,
    as_json: bool = typer.Option(False, "--json", help="Print the caches as JSON."),
) -> None:
    """What edgekit keeps to go faster next time: each kind, its size and path.

    Clearing one costs a rerun the time to redo it (train, encode, sample), never a model:
    the library ('edgekit rm'), devices, known_hosts and chats are not touched.

    Examples:
      edgekit cache
      edgekit cache clear heal
      edgekit cache clear -y
    """
    if ctx.invoked_subcommand is not None:
        return
    from edgekit.fsutil import edgekit_home

    _warn_about_home()
    rows = _caches()
    if as_json:
        print_json({"home": str(edgekit_home(create=False)), "caches": rows})
        return
    width = max(len(_mb(r["bytes"])) for r in rows)
    for r in rows:  # one line each, so a path is never folded and can be copied
        n = r["entries"]
        theirs = f" (and {len(r['others'])} not edgekit's, never cleared)" if r["others"] else ""
        say(out, tagged(f"{r['kind']:<6}", "bold", f"{_mb(r['bytes']):>{width}} MB  {n:>4} {'entry' if n == 1 else 'entries':<7}"
                                                    f"  {r['path']}  {r['holds']}{theirs}"))
    say(out, f"{_mb(sum(r['bytes'] for r in rows))} MB in all; 'edgekit cache clear [KIND]' deletes them (the "
             "model library, devices and chats are not caches: never touched)")


@cache_app.command("clear")
@handle_errors
def cache_clear(
    kinds: list[str] = typer.Argument(None, metavar="KIND...", help=f"Which: {', '.join(KINDS)} "
                                      "(default: all of them).", show_default=False),
    yes: bool = typer.Option(False, "--yes", "-y", help="Do not ask."),
) -> None:
    """Delete cached work: a rerun then redoes it (trains, encodes, samples again).

    A stopped --heal/--distill run's saved progress goes with 'heal'.

    Examples:
      edgekit cache clear heal aqlm
      edgekit cache clear -y
    """

    from edgekit.errors import InputError

    bad = [k for k in kinds or () if k not in KINDS]
    if bad:
        raise InputError(f"no cache kind {bad[0]!r}; give {', '.join(KINDS)} (or none: all of them)")
    _warn_about_home()
    chosen = [r for r in _caches() if not kinds or r["kind"] in kinds]
    rows = [r for r in chosen if r["entries"] or r["bytes"]]
    if not rows:
        say(out, "nothing to clear")
        _say_kept(chosen)
        return
    what = ", ".join(f"{r['kind']} ({_mb(r['bytes'])} MB)" for r in rows)
    if not yes:
        if not stdin_is_tty():
            raise InputError("cache clear asks before deleting, and stdin is not a terminal: pass -y to clear "
                             "without asking")
        if not typer.confirm(f"delete the caches {what}?", default=False, err=True):
            say(err, "kept them")
            return
    for r in rows:
        _clear(r["kind"], Path(r["path"]))
    left = {r["kind"]: r["bytes"] for r in _caches()}  # a live writer's temporary files stay
    say(out, f"{', '.join(r['kind'] for r in rows)}: {_mb(sum(r['bytes'] - left[r['kind']] for r in rows))} MB "
             "freed", "cleared", "green")
    _say_kept(chosen)


def _say_kept(rows: list[dict[str, Any]]) -> None:
    for r in rows:
        for other in r["others"]:
            say(err, f"kept {other}: edgekit did not write it (delete it yourself if it should go)")


def register(app: typer.Typer) -> None:
    app.command("ls")(ls)
    app.command("show")(show)
    app.command("rm")(rm)
    app.command("ps")(ps)
    app.command("registry")(registry)
    app.command("list", hidden=True)(list_alias)
    app.add_typer(cache_app, name="cache")
