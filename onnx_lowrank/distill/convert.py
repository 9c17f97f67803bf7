"""The low-rank ONNX model as a trainable torch module, and its trained weights back into ONNX.

onnx2torch converts the graph (a torch.fx module that reproduces onnxruntime to ~1e-6 on the CNNs
we have; writing our own interpreter would be a second implementation of ONNX's semantics to keep
right). Which torch tensor holds which ONNX initializer is found by converting a copy whose
trainable initializers carry unique tags, so the mapping never depends on the converter's naming
(a Conv's weight is a module parameter, a Gemm's a transposed nn.Linear weight, a MatMul's
constant an anonymous buffer). Training writes the tensors back by initializer name.
"""

from __future__ import annotations

import importlib
import logging
import sys
import types
from dataclasses import dataclass

import numpy as np
import onnx
import torch
from onnx import numpy_helper

log = logging.getLogger(__name__)


def onnx2torch_convert():
    """``onnx2torch.convert``. onnx2torch imports torchvision at its top for two converters (NMS and
    RoiAlign) that no layer we train needs; where torchvision cannot load (the registry's build
    is for CUDA torch, ours the CPU one) those two get a stand-in module, removed after the import."""
    try:
        return importlib.import_module("onnx2torch").convert
    except (ImportError, RuntimeError, OSError):
        for name in [n for n in sys.modules if n.split(".")[0] in ("onnx2torch", "torchvision")]:
            del sys.modules[name]
    stand_in, ops = types.ModuleType("torchvision"), types.ModuleType("torchvision.ops")

    def unavailable(*args, **kwargs):
        raise NotImplementedError("torchvision is not usable here: NMS and RoiAlign cannot be converted")

    ops.nms = ops.roi_align = ops.box_convert = unavailable
    stand_in.ops = ops
    sys.modules["torchvision"], sys.modules["torchvision.ops"] = stand_in, ops
    try:
        return importlib.import_module("onnx2torch").convert
    finally:
        del sys.modules["torchvision"], sys.modules["torchvision.ops"]


def constants_as_initializers(model: onnx.ModelProto) -> onnx.ModelProto:
    """A copy with every ``Constant`` node's tensor as an initializer (onnx2torch takes a
    constant-weight Conv only from initializers)."""
    copy = onnx.ModelProto()
    copy.CopyFrom(model)
    kept = []
    for node in copy.graph.node:
        value = next((a for a in node.attribute if a.name == "value"), None)
        if node.op_type == "Constant" and value is not None and len(node.attribute) == 1:
            tensor = onnx.TensorProto()
            tensor.CopyFrom(value.t)
            tensor.name = node.output[0]
            copy.graph.initializer.append(tensor)
        else:
            kept.append(node)
    del copy.graph.node[:]
    copy.graph.node.extend(kept)
    return copy


@dataclass
class Trainable:
    """One ONNX initializer as the torch tensor that holds it (transposed for an nn.Linear weight)."""

    name: str
    tensor: torch.nn.Parameter
    transposed: bool


class TorchStudent:
    """The student: ``model`` (with its extra outputs) as a torch module in eval mode (no dropout,
    fixed normalisation statistics), the initializers ``trainable`` as its parameters."""

    def __init__(self, model: onnx.ModelProto, trainable: list[str]) -> None:
        convert = onnx2torch_convert()
        model = constants_as_initializers(model)
        self.output_names = [o.name for o in model.graph.output]
        self.module = convert(_tagged(model, trainable)).eval()
        for parameter in self.module.parameters():
            parameter.requires_grad_(False)
        self.trainable = _find_tags(self.module, model, trainable)
        initializers = {i.name: i for i in model.graph.initializer}
        for item in self.trainable:
            value = torch.from_numpy(np.array(numpy_helper.to_array(initializers[item.name]), dtype=np.float32))
            with torch.no_grad():
                item.tensor.copy_(value.T if item.transposed else value)
            item.tensor.requires_grad_(True)

    def __call__(self, feeds: list[torch.Tensor]) -> dict[str, torch.Tensor]:
        outputs = self.module(*feeds)
        outputs = outputs if isinstance(outputs, (tuple, list)) else (outputs,)
        return dict(zip(self.output_names, outputs))

    def parameters(self) -> list[torch.nn.Parameter]:
        return [item.tensor for item in self.trainable]

    def state(self) -> dict[str, np.ndarray]:
        """The trainable weights, in ONNX layout, by initializer name."""
        return {item.name: (item.tensor.detach().T if item.transposed else item.tensor.detach()).cpu().numpy().copy()
                for item in self.trainable}

    def load(self, state: dict[str, np.ndarray]) -> None:
        with torch.no_grad():
            for item in self.trainable:
                value = torch.from_numpy(state[item.name])
                item.tensor.copy_(value.T if item.transposed else value)


def with_weights(model: onnx.ModelProto, state: dict[str, np.ndarray]) -> onnx.ModelProto:
    """A copy of ``model`` with the initializers named in ``state`` replaced (dtype kept)."""
    copy = onnx.ModelProto()
    copy.CopyFrom(model)
    for initializer in copy.graph.initializer:
        if initializer.name in state:
            dtype = numpy_helper.to_array(initializer).dtype
            initializer.CopyFrom(numpy_helper.from_array(state[initializer.name].astype(dtype), initializer.name))
    return copy


def _tag(index: int, shape: tuple[int, ...]) -> np.ndarray:
    """A value no other tensor holds: zeros with (index + 1) at the first element and, for a
    matrix, a second mark above the diagonal, so a transposed copy is told apart."""
    tag = np.zeros(shape, np.float32)
    if tag.size:
        tag.flat[0] = index + 1
        if tag.ndim == 2 and shape[1] > 1:
            tag[0, 1] = -(index + 1)
    return tag


def _tagged(model: onnx.ModelProto, names: list[str]) -> onnx.ModelProto:
    return with_weights(model, {name: _tag(i, tuple(_shape(model, name))) for i, name in enumerate(names)})


def _shape(model: onnx.ModelProto, name: str) -> list[int]:
    return list(next(i.dims for i in model.graph.initializer if i.name == name))


def _find_tags(module: torch.nn.Module, model: onnx.ModelProto, names: list[str]) -> list[Trainable]:
    """Each tagged initializer's tensor in ``module``; a buffer becomes a parameter. An initializer
    the converter changed (scaled, reshaped) is not found and stays fixed."""
    holders = {}
    for owner_name, owner in module.named_modules():
        for attr, tensor in [*owner.named_parameters(recurse=False), *owner.named_buffers(recurse=False)]:
            holders[(owner_name, attr)] = (owner, attr, tensor)
    found = []
    for index, name in enumerate(names):
        tag = torch.from_numpy(_tag(index, tuple(_shape(model, name))))
        matches = [(owner, attr, transposed) for owner, attr, tensor in holders.values()
                   for transposed, candidate in ((False, tag), (True, tag.T if tag.ndim == 2 else None))
                   if candidate is not None and tensor.shape == candidate.shape and torch.equal(tensor, candidate)]
        if len(matches) != 1:
            log.debug("distillation: %s is held by %d tensors of the converted module; left fixed", name, len(matches))
            continue
        owner, attr, transposed = matches[0]
        tensor = getattr(owner, attr)
        if not isinstance(tensor, torch.nn.Parameter):
            del owner._buffers[attr]
            owner.register_parameter(attr, torch.nn.Parameter(tensor.clone()))
        found.append(Trainable(name, getattr(owner, attr), transposed))
    return found
