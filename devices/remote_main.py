"""What ``remote_profile`` runs on an SSH board: edgekit's profiler on a pushed artifact, JSON on stdout.

    python -m edgekit.devices.remote_main ARTIFACT --tests pp512,tg128 --reps 5 [--threads N]
"""

from __future__ import annotations

import argparse
import json
import sys


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="edgekit.devices.remote_main")
    p.add_argument("artifact")
    p.add_argument("--tests", default="pp512,tg128")
    p.add_argument("--reps", type=int, default=5)
    p.add_argument("--threads", type=int, default=None)
    a = p.parse_args(argv)
    from edgekit.errors import EdgekitError
    from edgekit.runtime.profile import ProfileConfig, profile
    from edgekit.runtime.profile_schema import parse_tests

    try:
        run = profile([a.artifact], ProfileConfig(tests=parse_tests(a.tests), reps=a.reps, threads=(a.threads,)))
    except EdgekitError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return exc.exit_code
    json.dump(run.to_json(), sys.stdout)
    return 0


if __name__ == "__main__":
    sys.exit(main())
