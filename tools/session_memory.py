"""What an onnxruntime session of a model holds beyond its weights, and how fast it runs, for each
way of handing onnxruntime the weights the process already holds as arrays:

- ``copied``: ``SessionOptions.add_external_initializers`` (what the tool does): onnxruntime
  copies them into its graph; every graph optimisation applies.
- ``inputs``: the weights as graph inputs, fed at every run: onnxruntime reads the arrays in
  place; optimisations that need constant weights (pre-laid-out convolutions) do not apply.
- ``shared``: ``SessionOptions.add_initializer`` (the caller's buffer, kept alive by the caller),
  which onnxruntime accepts only with graph optimisations off (``shared-optimised``, with them on,
  is refused: its optimisers read the graph's own copy of the tensor first).

Also tried, and printed as refused: the in-memory address marker onnxruntime uses internally for
external data. Each session's resident-memory growth is read from /proc (Linux), its run time is
the best of three runs of one random batch.

    python tools/session_memory.py /tmp/vgg16-224.onnx --batch 8
"""

from __future__ import annotations

import argparse
import gc
import tempfile
import time
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort

from onnx_lowrank.graph.io import weights_apart

WAYS = ("copied", "inputs", "shared", "shared-optimised", "address")


def resident_mib() -> float:
    return int(Path("/proc/self/statm").read_text().split()[1]) * 4096 / 2**20


def session(light: onnx.ModelProto, arrays: dict[str, np.ndarray], way: str, threads: int, folder: Path):
    """The session, the feeds each of its runs adds (the weights, where they are inputs), and the
    OrtValues over ``arrays``, which must outlive it where it shares them."""
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.log_severity_level = 4  # a refusal is printed as a result, in one line
    options.add_session_config_entry("session.disable_prepacking", "1")
    model = onnx.ModelProto()
    model.CopyFrom(light)
    values = {name: ort.OrtValue.ortvalue_from_numpy(array) for name, array in arrays.items()}
    feeds = {}
    if way == "copied":
        options.add_external_initializers(list(values), list(values.values()))
    elif way == "inputs":
        kept = [t for t in model.graph.initializer if t.name not in arrays]
        model.graph.input.extend(onnx.helper.make_tensor_value_info(t.name, t.data_type, list(t.dims))
                                 for t in model.graph.initializer if t.name in arrays)
        del model.graph.initializer[:]
        model.graph.initializer.extend(kept)
        feeds = values
    else:
        (folder / "placeholder").touch()
        for tensor in model.graph.initializer:
            for entry in tensor.external_data if tensor.name in arrays else ():
                if entry.key == "location":
                    entry.value = "*/_ORT_MEM_ADDR_/*" if way == "address" else "placeholder"
                if entry.key == "offset" and way == "address":
                    entry.value = str(arrays[tensor.name].ctypes.data)
        if way.startswith("shared"):
            if way == "shared":
                options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
            options.add_session_config_entry("session.model_external_initializers_file_folder_path", str(folder))
            for name, value in values.items():
                options.add_initializer(name, value)
    return ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"]), feeds, values


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("model", type=Path)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    light, arrays = weights_apart(onnx.load(args.model))
    arrays = {name: np.array(array) for name, array in arrays.items()}  # writable, owned by this process
    gc.collect()
    print(f"{args.model.name}: {sum(a.nbytes for a in arrays.values()) / 2**20:.0f} MiB of weights as arrays")
    first = light.graph.input[0]
    shape = [args.batch] + [d.dim_value for d in first.type.tensor_type.shape.dim[1:]]
    batch = np.random.default_rng(0).random(shape, dtype=np.float32)
    for way in WAYS:
        with tempfile.TemporaryDirectory() as folder:
            before = resident_mib()
            try:
                built, feeds, values = session(light, arrays, way, args.threads, Path(folder))
            except Exception as exc:  # a way onnxruntime refuses is a result here
                print(f"{way:8s} refused: {str(exc).splitlines()[0][:160]}")
                continue
            grown = resident_mib() - before
            run_feeds = {first.name: batch, **feeds}
            built.run(None, run_feeds)
            times = []
            for _ in range(3):
                start = time.perf_counter()
                built.run(None, run_feeds)
                times.append(time.perf_counter() - start)
            print(f"{way:8s} session +{grown:.0f} MiB, a batch of {args.batch} in {min(times):.3f} s")
            del built, values
            gc.collect()


if __name__ == "__main__":
    main()
