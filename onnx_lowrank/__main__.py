"""``python -m onnx_lowrank`` and the ``onnx-lowrank`` command."""

from __future__ import annotations

import importlib.util
import os
import signal
import sys


def main(argv: list[str] | None = None) -> None:
    # Nothing is written before a run starts: an interrupt while the heavy modules load just exits.
    for signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, lambda received, frame: os._exit(128 + received))
    if importlib.util.find_spec("onnxruntime") is None:  # the build is the user's choice of extra
        sys.stderr.write("error: onnxruntime is not installed (hint: pip install 'onnx-lowrank[cpu]', or [gpu] "
                         "for CUDA and TensorRT, [openvino] for OpenVINO)\n")
        sys.exit(2)
    from onnx_lowrank.cli.app import main as run_cli

    run_cli(argv)


if __name__ == "__main__":
    main()
