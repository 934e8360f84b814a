"""``medaug <stage> key=value ...``: the installed command, one Hydra app per stage; ``medaug run key=value ...``
runs a whole job (prepare → train → sample → evaluate → export) with one set of overrides."""

from __future__ import annotations

import importlib
import sys

STAGES = (
    "run",
    "prepare",
    "train_autoencoder",
    "train",
    "sample",
    "evaluate",
    "export",
    "export_bundle",
    "augment",
    "inpaint",
)


def main() -> None:
    if len(sys.argv) < 2 or sys.argv[1] not in STAGES:
        print(f"usage: medaug {{{'|'.join(STAGES)}}} [key=value ...] [--help]", file=sys.stderr)
        raise SystemExit(2)
    stage = sys.argv.pop(1)
    sys.argv[0] = f"medaug-{stage}"
    importlib.import_module(f"pipelines.{stage}").main()


if __name__ == "__main__":
    main()
