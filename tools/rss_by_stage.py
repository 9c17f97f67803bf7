"""Peak resident memory of one onnx-lowrank run, per stage: runs the command given after ``--``,
reads its stage lines from stderr and samples VmRSS (Linux) twice a second.

    python tools/rss_by_stage.py -- IN.onnx OUT.onnx --speedup 1.25 --calib calib.npy
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import threading
import time


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("arguments", nargs=argparse.REMAINDER, help="the onnx-lowrank arguments, after --")
    arguments = [a for a in parser.parse_args().arguments if a != "--"]
    process = subprocess.Popen([sys.executable, "-m", "onnx_lowrank", *arguments], stdout=subprocess.DEVNULL,
                               stderr=subprocess.PIPE, text=True)
    stage = ["start"]

    def follow() -> None:
        for line in process.stderr:
            stage[0] = line.strip()[20:].split(":")[0]  # the stage name after the timestamp

    threading.Thread(target=follow, daemon=True).start()
    peaks: dict[str, float] = {}
    while process.poll() is None:
        try:
            with open(f"/proc/{process.pid}/status") as status:
                rss = next(int(line.split()[1]) for line in status if line.startswith("VmRSS")) / 1e6
        except (OSError, StopIteration):
            break
        peaks[stage[0]] = max(peaks.get(stage[0], 0.0), rss)
        time.sleep(0.5)
    for name, peak in peaks.items():
        print(f"{peak:6.2f} GB  {name}")
    sys.exit(process.returncode)


if __name__ == "__main__":
    main()
