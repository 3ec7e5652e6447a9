"""``edgekit neurons``: hot/cold neuron statistics of a SwiGLU checkpoint and the quality cost of activation
sparsity (TEAL, CATS, and the bounds of neuron- and cluster-granular skipping), as a table, a JSON file
and a plot."""

from __future__ import annotations

import json
import os
from pathlib import Path

import typer

from edgekit.cli.ui import handle_errors, out, print_json, progress_bar, progress_unless_piped, say


@handle_errors
def neurons_cmd(
    model: Path = typer.Argument(..., help="Hugging Face checkpoint folder (a SwiGLU model: Llama, Mistral, Qwen2, Qwen3)."),
    text: Path | None = typer.Option(None, "--text", help="Plain-text file for perplexity/KL (default: the sample "
                                     "text edgekit ships)."),
    sparsity: str = typer.Option("0.25,0.4,0.5,0.6", "--sparsity", help="Activation sparsities to measure."),
    chunks: int = typer.Option(8, "--chunks", help="512-token chunks of --text to measure on."),
    clusters: int = typer.Option(16, "--clusters", help="Cold clusters of the --sparse-ffn layout whose "
                                 "perfect-router quality is measured (as convert's -O sparse_clusters)."),
    calib: str = typer.Option("self", "--calib", help="Calibration data: 'self' (sampled from the model) or a text file."),
    calib_samples: int = typer.Option(32, "--calib-samples", help="Calibration sequences."),
    calib_seqlen: int = typer.Option(512, "--calib-seqlen", help="Tokens per calibration sequence."),
    output: Path | None = typer.Option(None, "--output", "-o", help="Folder for neurons.json and neurons.png "
                                       "(default MODEL-neurons)."),
    as_json: bool = typer.Option(False, "--json", help="Print the report as JSON."),
    threads: int | None = typer.Option(None, "--threads", "-t", help="CPU threads for PyTorch."),
) -> None:
    """Which FFN neurons are hot, is it a power law, and what TEAL/CATS sparsity costs.

    Two bounds, picked with the true activations:
      top-k: each token keeps its most useful neurons (best neuron-level skip)
      clusters: each token runs its best --sparse-ffn clusters (perfect router)

    Examples:
      edgekit neurons ./SmolLM2-135M
      edgekit neurons ./SmolLM2-135M --text wiki.valid.txt --sparsity 0.4,0.5 --chunks 16
    """
    from rich.table import Table

    from edgekit.calibration import CalibConfig
    from edgekit.cli.flags import check_calib_seqlen
    from edgekit.converters.sparse_ffn.config import clusters_flag
    from edgekit.errors import InputError
    from edgekit.evaluate import read_text
    from edgekit.fsutil import atomic_file, make_dir
    from edgekit.quickstart import sample_text_path
    from edgekit.runtime import activation_sparsity as neurons
    from edgekit.runtime.hostinfo import use_torch_threads

    try:
        levels = tuple(float(s) for s in sparsity.split(",") if s.strip())
    except ValueError:
        raise InputError("--sparsity takes comma-separated fractions, e.g. 0.25,0.5") from None
    if not levels or not all(0 < s < 1 for s in levels):
        raise InputError("--sparsity takes fractions between 0 and 1, e.g. 0.25,0.5")
    if clusters < 2 or clusters & (clusters - 1):
        raise InputError(f"--clusters {clusters}: give a power of two >= 2 (e.g. 16), as convert's -O sparse_clusters")
    refuse_artifact(model)
    check_calib_seqlen(calib_seqlen, model)
    folder = output or model.parent / f"{model.name}-neurons"
    check_writable(folder, f"-o {folder}" if output is not None else
                   f"the output folder {folder} (by default beside the model)")
    use_torch_threads(threads)
    body = read_text(text or sample_text_path())
    with progress_bar(progress_unless_piped(as_json)) as progress, clusters_flag("--clusters {}"):  # fixes name neurons' flag
        rep = neurons.analyze(model, body, sparsities=levels, calib=CalibConfig(source=calib, samples=calib_samples,
                              seqlen=calib_seqlen), chunks=chunks, clusters=clusters, progress=progress)
    make_dir(folder, "choose another folder with -o")
    with atomic_file(folder / "neurons.json") as tmp:
        tmp.write_text(json.dumps(rep.to_json(), indent=1))
    neurons.plot(rep, folder / "neurons.png")
    if as_json:
        print_json(rep.to_json())
        return
    s = rep.to_json()["summary"]
    say(out, f"neuron frequency vs rank, log-log fit over {len(rep.layers)} layers: slope {s['slope']:.2f}, "
             f"R^2 {s['r2']:.3f}; the hottest 20% of neurons carry {s['top20_share']:.0%} of activations")
    t = Table("method", "sparsity", "ppl", "ppl +%", "KL", "top-1", title=f"dense ppl {rep.dense_ppl:.3f}")
    for q in rep.quality:
        label = neurons.LABELS[q["method"]]
        if "clusters_run" in q:
            label += f" {q['clusters_run']}/{rep.layout['clusters']}"
        t.add_row(label, f"{q['sparsity']:.0%}", f"{q['ppl']:.3f}", f"{100 * q['ppl_increase']:+.1f}",
                  f"{q['kl_mean']:.4f}", f"{q['top1_agreement']:.3f}")
    out.print(t)
    if rep.layout and "skipped" in rep.layout:
        say(out, f"no clusters rows: {rep.layout['skipped']}", "note", "yellow")
    say(out, f"{folder / 'neurons.json'}, {folder / 'neurons.png'}", "wrote", "green")


def check_writable(folder: Path, named: str) -> None:
    """Refuse, before minutes of measuring, an output folder that cannot be made or written: the nearest folder
    that exists must be a writable folder. ``named``: how the message names ``folder``."""
    from edgekit.errors import InputError
    from edgekit.fslimits import nearest_existing

    probe = nearest_existing(folder)
    if not probe.is_dir():
        raise InputError(f"cannot write {named}: {probe} is a file; choose another folder with -o")
    if not os.access(probe, os.W_OK | os.X_OK):
        raise InputError(f"cannot write {named}: {probe} is not writable; choose another folder with -o")


def refuse_artifact(model: Path) -> None:
    """An edgekit artifact (a folder or a library name) is not a checkpoint: name the one it was made from."""
    from edgekit import library
    from edgekit.artifact import MANIFEST_NAME
    from edgekit.errors import InputError

    if (model / "config.json").is_file():
        return
    p = library.resolve(model)
    if not (p / MANIFEST_NAME).is_file():
        return  # not an artifact: the checkpoint reader says what is wrong
    try:
        source = json.loads((p / MANIFEST_NAME).read_text())["source"]["path"]
    except (OSError, ValueError, KeyError, TypeError):
        source = None
    fix = f": edgekit neurons {source}" if isinstance(source, str) and source else ""
    raise InputError(f"{model} is an edgekit artifact ({p}), not a Hugging Face checkpoint folder; neurons reads "
                     f"the checkpoint it was converted from{fix}")


def register(app: typer.Typer) -> None:
    app.command("neurons")(neurons_cmd)
