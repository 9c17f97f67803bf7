"""``python -m onnx_lowrank`` and the ``onnx-lowrank`` command."""

from __future__ import annotations

import os
import signal


def main(argv: list[str] | None = None) -> None:
    # Nothing is written before a run starts: an interrupt while the heavy modules load just exits.
    for signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, lambda received, frame: os._exit(128 + received))
    from onnx_lowrank.cli import main as run_cli

    run_cli(argv)


if __name__ == "__main__":
    main()
