"""Odd and hostile inputs: each is one `error: …` line and exit 2 (or, where the input is usable,
a correct run), never a traceback, an internal error or a silently wrong result."""

from __future__ import annotations

import json

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from tests.builders import Layer, conv_net
from tests.test_cli import invoke
from tests.test_outputs import snapshot

RUN = ["--speedup", "1.5", "--no-bench", "--threads", "1"]


def one_error(folder, *args, message: str) -> None:
    before = snapshot(folder)
    result = invoke(folder / "in.onnx", folder / "out.onnx", *args, *RUN)
    assert result.exit_code == 2, result.output
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0], result.output
    assert snapshot(folder) == before


def calib_with(folder, name: str, **arrays) -> str:
    np.savez(folder / name, **arrays)
    return str(folder / name)


def images(count: int = 40) -> np.ndarray:
    return np.random.default_rng(1).standard_normal((count, 3, 10, 10)).astype(np.float32)


@pytest.mark.parametrize("case", ["strings", "complex", "one-hot-labels", "labels-wrong-length", "negative-labels",
                                  "nan", "static-input-size", "reader-exits", "reader-raises", "reader-not-dict"])
def test_bad_data_is_one_line(folder, case) -> None:
    np.save(folder / "strings.npy", np.array([["a"] * 10] * 3))
    np.save(folder / "complex.npy", images().astype(np.complex64))
    (folder / "exits.py").write_text("import sys\nsys.exit(0)\n")
    (folder / "raises.py").write_text("class R:\n    def get_next(self):\n        raise RuntimeError('boom')\n")
    (folder / "notdict.py").write_text("class R:\n    def get_next(self):\n        return [1, 2]\n")
    nan = images()
    nan[3, 0, 0, 0] = np.nan
    args, message = {
        "strings": (["--calib", folder / "strings.npy"], "not real numbers"),
        "complex": (["--calib", folder / "complex.npy"], "not real numbers"),
        "one-hot-labels": (["--calib", calib_with(folder, "onehot.npz", input=images(),
                                                  labels=np.eye(5)[np.arange(40) % 5])], "argmax"),
        "labels-wrong-length": (["--calib", calib_with(folder, "short.npz", input=images(), labels=np.arange(30) % 5)],
                                "30 labels for 40 samples"),
        "negative-labels": (["--calib", calib_with(folder, "negative.npz", input=images(), labels=-np.ones(40))],
                            "non-negative class indices"),
        "nan": (["--calib", calib_with(folder, "nan.npz", input=nan)], "NaN"),
        "static-input-size": (["--input-size", "20x20"], "fixed size 10x10"),
        "reader-exits": (["--calib", f"{folder / 'exits.py'}:R"], "SystemExit"),
        "reader-raises": (["--calib", f"{folder / 'raises.py'}:R"], "boom"),
        "reader-not-dict": (["--calib", f"{folder / 'notdict.py'}:R"], "expected a dict"),
    }[case]
    one_error(folder, *args, message=message)


def test_float_labels_that_are_class_indices_give_the_true_accuracy(folder) -> None:
    labels = np.arange(40) % 5
    as_int = calib_with(folder, "int.npz", input=images(), labels=labels)
    as_float = calib_with(folder, "float.npz", input=images(), labels=labels.astype(np.float32))
    reports = []
    for evaluation in (as_int, as_float):
        assert invoke(folder / "in.onnx", folder / "out.onnx", "--calib", folder / "calib.npz", "--eval", evaluation,
                      "--report", folder / "r.json", *RUN).exit_code == 0
        reports.append(json.loads((folder / "r.json").read_text())["fidelity"])
    assert reports[0]["accuracy_original"] == reports[1]["accuracy_original"] > 0


def test_a_reader_that_never_ends_is_cut_at_the_sample_count(folder) -> None:
    (folder / "endless.py").write_text("import numpy as np\nclass R:\n    def get_next(self):\n"
                                       "        return {'input': np.ones((2, 3, 10, 10), np.float32)}\n")
    result = invoke(folder / "in.onnx", folder / "out.onnx", "--calib", f"{folder / 'endless.py'}:R",
                    "--num-images", "20", "--report", folder / "r.json", *RUN)
    assert result.exit_code == 0, result.output
    assert json.loads((folder / "r.json").read_text())["calibration_samples"] <= 20


def test_unusable_images_are_left_out_with_a_warning(folder) -> None:
    from PIL import Image

    (folder / "photos").mkdir()
    for index in range(12):
        pixels = (np.random.default_rng(index).random((16, 16, 3)) * 255).astype(np.uint8)
        Image.fromarray(pixels).save(folder / "photos" / f"ok{index}.png")
    (folder / "photos" / "fake.jpg").write_text("not an image")
    # A decompression bomb: its header claims more pixels than Pillow will decode.
    Image.new("1", (16, 16)).save(folder / "photos" / "bomb.png")
    data = bytearray((folder / "photos" / "bomb.png").read_bytes())
    data[16:24] = (60000).to_bytes(4, "big") + (60000).to_bytes(4, "big")
    (folder / "photos" / "bomb.png").write_bytes(bytes(data))
    result = invoke(folder / "in.onnx", folder / "out.onnx", "--calib", folder / "photos", *RUN)
    assert result.exit_code == 0, result.output
    assert "2 file(s)" in result.stderr and "not usable images" in result.stderr


def test_a_folder_of_nothing_but_broken_images_is_one_line(folder) -> None:
    (folder / "photos").mkdir()
    (folder / "photos" / "a.png").write_bytes(b"\x89PNG broken")
    one_error(folder, "--calib", folder / "photos", message="no readable images")


def test_a_kernel_larger_than_its_padded_input_is_one_line(folder) -> None:
    model = conv_net([Layer(16), Layer(32, k=7, pads=[0, 0, 0, 0]), Layer(32, k=7, pads=[0, 0, 0, 0])],
                     size=(10, 10), classifier=5)
    onnx.save(model, folder / "in.onnx")
    one_error(folder, "--calib", folder / "calib.npz", message="onnxruntime cannot run the model")


def conv_inside_if() -> onnx.ModelProto:
    model = conv_net([Layer(16), Layer(32), Layer(32)], size=(10, 10), classifier=5)
    graph = model.graph
    first_relu = next(n for n in graph.node if n.op_type == "Relu")
    weight = numpy_helper.from_array(np.ones((16, 16, 3, 3), np.float32) / 144, "inner_w")
    then_branch = helper.make_graph([helper.make_node("Conv", [first_relu.output[0], "inner_w"], ["then_out"],
                                                      pads=[1, 1, 1, 1], name="inner_conv")], "then", [],
                                    [helper.make_tensor_value_info("then_out", TensorProto.FLOAT, None)], [weight])
    else_branch = helper.make_graph([helper.make_node("Identity", [first_relu.output[0]], ["else_out"])], "else", [],
                                    [helper.make_tensor_value_info("else_out", TensorProto.FLOAT, None)])
    graph.initializer.append(numpy_helper.from_array(np.array(True), "cond"))
    position = list(graph.node).index(first_relu) + 1
    graph.node.insert(position, helper.make_node("If", ["cond"], ["if_out"], then_branch=then_branch,
                                                 else_branch=else_branch, name="branch"))
    next(n for n in list(graph.node)[position + 1:] if n.op_type == "Conv").input[0] = "if_out"
    onnx.checker.check_model(model)
    return model


def test_a_conv_inside_an_if_is_left_alone_with_a_reason(folder) -> None:
    onnx.save(conv_inside_if(), folder / "in.onnx")
    result = invoke(folder / "in.onnx", folder / "out.onnx", "--calib", folder / "calib.npz",
                    "--report", folder / "r.json", *RUN)
    assert result.exit_code == 0, result.output
    layers = {layer["name"]: layer for layer in json.loads((folder / "r.json").read_text())["layers"]}
    assert "If/Loop/Scan" in layers["inner_conv"]["skipped_reason"]
    assert any(layer["rank"] for layer in layers.values())


def test_names_with_markup_and_commas_are_printed_and_skipped_verbatim(folder) -> None:
    model = onnx.load(str(folder / "in.onnx"))
    convs = [n for n in model.graph.node if n.op_type == "Conv"]
    for conv, name in zip(convs, ["[bold]first", "second[/]", "third,conv"]):
        conv.name = name
    onnx.save(model, folder / "in.onnx")
    result = invoke(folder / "in.onnx", folder / "out.onnx", "--calib", folder / "calib.npz", "--skip", "third,conv",
                    "--report", folder / "r.json", "--speedup", "1.2", "--no-bench", "--rank-multiple", "4")
    assert result.exit_code == 0, result.output
    assert "[bold]first" in result.stdout and "second[/]" in result.stdout
    layers = {layer["name"]: layer for layer in json.loads((folder / "r.json").read_text())["layers"]}
    assert layers["third,conv"]["skipped_reason"] == "skipped by --skip"
    one_error(folder, "--calib", folder / "calib.npz", "--skip", "third,nope", message="'nope'")
