"""The digits metrics on real digits, on images that are not digits, and on a diffusion model at several
step counts, all at the same N against the same reference (the feature network's training split).

Rows: the held-out real digits (1000, 100 per class: the FID floor), the same blurred (3x3 box filter),
uniform noise, 200 of the held-out digits (how FID's bias grows at a smaller N), then the model sampled with DDIM at each ``--steps`` (N images, classes balanced, batch 250).
Writes ``bench/results/digits_metrics.{txt,json,png}`` (the png: the first 40 samples of each model row;
``--out PATH``: ``PATH.txt``, ``.json``, ``.png``).

    .venv/bin/python bench/digits_metrics.py --pipeline edgekit/data/digits-unet --steps 50,4,2
    .venv/bin/python bench/digits_metrics.py --pipeline ./tiny-pipe --steps 4 -n 200 --out /tmp/dm   # a quick check
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

import numpy as np

from edgekit import imagemetrics as im
from edgekit.converters.diffusion.miniature import digits
from edgekit.evaluate import measure_diffusion, open_diffusion

RESULTS = Path(__file__).parent / "results"


def real_rows(net: im.FeatureNet) -> list[dict]:
    import torch

    x, y = digits(im.SIZE)
    _, ho = im.split_indices(y)
    real, labels = x[ho], y[ho]
    blur = torch.nn.functional.avg_pool2d(torch.from_numpy(real), 3, 1, 1, count_include_pad=False).numpy()
    noise = np.random.default_rng(1).uniform(-1, 1, real.shape).astype(np.float32)
    small = np.concatenate([np.flatnonzero(labels == c)[:20] for c in range(10)])  # FID's bias at small N
    rows = [{"row": name, **im.score(images, labels, net)}
            for name, images in (("real held-out (floor)", real), ("real held-out, blurred 3x3", blur),
                                 ("uniform noise", noise))]
    return rows + [{"row": "real held-out, first 20 per class", **im.score(real[small], labels[small], net)}]


def write_png(grids: list[tuple[str, np.ndarray]], path: Path) -> None:
    from PIL import Image, ImageDraw

    from edgekit.converters.diffusion.sampler import to_uint8

    scale, cols, label_h = 3, 10, 14
    tiles = []
    for name, images in grids:
        u8 = to_uint8(images[:40])[..., 0]
        rows = int(np.ceil(len(u8) / cols))
        canvas = np.zeros((label_h + rows * 17 * scale, cols * 17 * scale), np.uint8)
        for i, img in enumerate(u8):
            r, c = divmod(i, cols)
            big = np.kron(img, np.ones((scale, scale), np.uint8))
            canvas[label_h + r * 17 * scale: label_h + r * 17 * scale + 16 * scale,
                   c * 17 * scale: c * 17 * scale + 16 * scale] = big
        tile = Image.fromarray(canvas)
        ImageDraw.Draw(tile).text((2, 1), name, fill=255)
        tiles.append(tile)
    out = Image.new("L", (max(t.width for t in tiles), sum(t.height + 6 for t in tiles)))
    y = 0
    for t in tiles:
        out.paste(t, (0, y))
        y += t.height + 6
    out.save(path)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=" ".join(__doc__.split("\n\n")[0].split()))
    ap.add_argument("--pipeline", type=Path, help="diffusion pipeline folder (or artifact) to sample")
    ap.add_argument("--steps", default="50,4,2", help="DDIM step counts, comma-separated")
    ap.add_argument("-n", type=int, default=1000, help="images per model row (classes balanced)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--name", default="digits_metrics", help="bench/results/NAME.{txt,json,png} (without --out)")
    ap.add_argument("--out", type=Path, default=None,
                    help="writes OUT.txt, OUT.json and OUT.png (default: bench/results/NAME)")
    args = ap.parse_args(argv)
    out = args.out if args.out is not None else RESULTS / args.name
    net = im.FeatureNet.load()
    record = json.loads(net.meta["record"])
    rows = real_rows(net)
    grids = []
    if args.pipeline is not None:
        model = open_diffusion(args.pipeline)
        for steps in (int(s) for s in args.steps.split(",")):
            print(f"sampling {args.n} images with ddim {steps} steps...", file=sys.stderr, flush=True)
            res, images = measure_diffusion(model, args.n, steps, "ddim", seed=args.seed)
            rows.append({"row": f"{model.name} ddim {steps}", **res})
            grids.append((f"{model.name} ddim {steps}: FID {res['fid']:.1f}", images))
    head = (f"digits-FID/1: feature network {record['params']:,} parameters, held-out accuracy "
            f"{100 * record['heldout_accuracy']:.1f}% ({record['heldout_n']} images); reference "
            f"{record['reference_n']} digits; k=3 for precision/recall. Machine shared (2 cores), timings noisy.")
    lines = [head, "", f"{'row':<36} {'N':>5} {'FID':>9} {'prec':>6} {'recall':>6} {'labels':>7} {'s':>8} {'img/s':>7}"]
    for r in rows:
        la = "-" if r.get("label_agreement") is None else f"{100 * r['label_agreement']:.1f}%"
        secs = f"{r['seconds']:.1f}" if "seconds" in r else "-"
        ips = f"{r['images_per_second']:.1f}" if r.get("images_per_second") else "-"
        lines.append(f"{r['row']:<36} {r['n']:>5} {r['fid']:>9.2f} {r['precision']:>6.3f} {r['recall']:>6.3f} "
                     f"{la:>7} {secs:>8} {ips:>7}")
    text = "\n".join(lines)
    print(text)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".txt").write_text(text + "\n")
    meta = {"machine": platform.machine(), "python": platform.python_version(), "network": record,
            "pipeline": str(args.pipeline) if args.pipeline else None, "date": time.strftime("%Y-%m-%d %H:%M UTC",
                                                                                              time.gmtime())}
    out.with_suffix(".json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=2) + "\n")
    if grids:
        write_png(grids, out.with_suffix(".png"))
    print(f"wrote {out.with_suffix('.txt')}, .json" + (", .png" if grids else ""))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
