"""Shared graphsurgeon helpers: constants, consumers, export that keeps the model's identity."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import numpy as np
import onnx
import onnx_graphsurgeon as gs

from onnx_lowrank.graph.io import names_read_by_subgraphs, stored_array


@contextmanager
def imported(model: onnx.ModelProto) -> Iterator[gs.Graph]:
    """``model`` as a graphsurgeon graph, whose constants' arrays (loaded as read) are dropped as
    the block ends. A graph's nodes and tensors refer to each other, so it outlives its last use
    until the collector's next whole pass, and with it every array it loaded, a copy of the
    weights (VGG-16 224: 1.3 GB more at the run's peak); a pass at every import would cost 25 ms
    each (a second of a demo search). The arrays kept elsewhere (a unit's weight) stay."""
    graph = gs.import_onnx(model)
    before = _constants(graph)  # with those a fold or a clean-up takes out of the graph
    try:
        yield graph
    finally:
        for tensor in {**before, **_constants(graph)}.values():
            tensor.values = None


def _constants(graph: gs.Graph) -> dict[int, gs.Constant]:
    return {id(tensor): tensor for part in (graph, *graph.subgraphs(recursive=True))
            for tensor in part.tensors().values() if isinstance(tensor, gs.Constant)}


def constant_value(tensor: gs.Tensor | None) -> np.ndarray | None:
    """The value of an initializer or of a Constant node's output; None for anything computed."""
    if tensor is None:
        return None
    if isinstance(tensor, gs.Constant):
        lazy = tensor._values  # graphsurgeon keeps an initializer's TensorProto here until its values are read
        stored = stored_array(lazy.tensor) if isinstance(lazy, gs.ir.tensor.LazyValues) else None
        return stored if stored is not None else np.asarray(tensor.values)
    if len(tensor.inputs) == 1 and tensor.inputs[0].op == "Constant":
        value = tensor.inputs[0].attrs.get("value")
        if isinstance(value, gs.Constant):
            return np.asarray(value.values)
    return None


def sole_consumer(graph: gs.Graph, tensor: gs.Tensor) -> gs.Node | None:
    """The one node reading ``tensor``, unless it is also a graph output or read by several nodes."""
    if tensor in graph.outputs or len(tensor.outputs) != 1:
        return None
    return tensor.outputs[0]


def prefix_model(model: onnx.ModelProto, outputs: list[str],
                 given: list[onnx.ValueInfoProto] | None = None) -> onnx.ModelProto:
    """A copy of ``model`` that computes only ``outputs``: the nodes nothing else needs are dropped,
    so running it costs the sub-graph up to those tensors, not the whole network. With ``given``
    (the values at a cut, ``cut_before``), those tensors are its inputs, and only the nodes from
    them to ``outputs`` are kept."""
    inputs = list(model.graph.input) if given is None else given
    stop = {info.name for info in inputs}
    needed = set(outputs)
    kept = []
    for node in reversed(model.graph.node):
        if needed.intersection(node.output) and (given is None or not stop.issuperset(node.output)):
            kept.append(node)
            needed.update(name for name in node.input if name and name not in stop)
            needed.update(names_read_by_subgraphs(node) - stop)
    return _part_of(model, list(reversed(kept)), inputs,
                    [onnx.helper.make_empty_tensor_value_info(name) for name in outputs], needed)


def cut_before(model: onnx.ModelProto, node_name: str) -> list[str]:
    """The tensors computed before node ``node_name`` (in the model's topological order), or fed
    to the model, that are read from it on: what the part of the model from it on needs, but
    for the outputs of ``Constant`` nodes (weights, as some exporters write them), which
    ``prefix_model(given=...)`` keeps in the part rather than as values to feed it."""
    constants = {name for node in model.graph.node if node.op_type == "Constant" for name in node.output}
    return [name for name in _split_at(model, node_name)[1] if name not in constants]


def suffix_model(model: onnx.ModelProto, node_name: str) -> tuple[onnx.ModelProto, list[str]]:
    """The part of ``model`` from node ``node_name`` on (in its topological order), as a model
    whose inputs are the tensors computed before that node and read from it on (the ``cut``,
    returned too): replacing that node and running the suffix from the cut's values costs only
    what follows it. Graph inputs read from the node on are part of the cut."""
    start, cut, read_after = _split_at(model, node_name)
    inputs = [onnx.helper.make_empty_tensor_value_info(name) for name in cut]
    return _part_of(model, list(model.graph.node)[start:], inputs, model.graph.output, read_after), cut


def _split_at(model: onnx.ModelProto, node_name: str) -> tuple[int, list[str], set[str]]:
    """Node ``node_name``'s position, the cut before it, and every name read from it on."""
    nodes = list(model.graph.node)
    start = next(i for i, node in enumerate(nodes) if node.name == node_name)
    initializers = {init.name for init in model.graph.initializer}
    produced_before = {name for node in nodes[:start] for name in node.output} | {i.name for i in model.graph.input}
    read_after = {name for node in nodes[start:] for name in (*node.input, *names_read_by_subgraphs(node)) if name}
    read_after |= {o.name for o in model.graph.output}
    return start, sorted((produced_before & read_after) - initializers), read_after


def _part_of(model: onnx.ModelProto, nodes, inputs, outputs, read: set[str]) -> onnx.ModelProto:
    """A model of ``nodes`` of ``model``, built up rather than copied and pruned: only the weights
    (and shape annotations) of the tensors in ``read`` are copied, once (a graph built apart and
    then set in the model would be copied twice: a second for a VGG-16's 400 MB fc6)."""
    part = onnx.ModelProto(ir_version=model.ir_version, opset_import=model.opset_import,
                           producer_name=model.producer_name, domain=model.domain, functions=model.functions)
    graph = part.graph
    graph.name = model.graph.name
    graph.node.extend(nodes)
    graph.input.extend(inputs)
    graph.output.extend(outputs)
    graph.initializer.extend(init for init in model.graph.initializer if init.name in read)
    graph.value_info.extend(info for info in model.graph.value_info if info.name in read)
    return part


def name_all_nodes(graph: gs.Graph) -> bool:
    """Give every node a unique, non-empty name: the report and --skip refer to nodes by name.
    Whether any node was renamed."""
    names = unique_names([(node.name, node.op) for node in graph.nodes])
    renamed = any(name != node.name for name, node in zip(names, graph.nodes))
    for name, node in zip(names, graph.nodes):
        node.name = name
    return renamed


def name_nodes_in_place(model: onnx.ModelProto) -> None:
    """``name_all_nodes``'s names, given to a model's own nodes: for a model this tool loaded
    itself, so that normalising it copies nothing where there is nothing to fold."""
    for name, node in zip(unique_names([(node.name, node.op_type) for node in model.graph.node]), model.graph.node):
        node.name = name


def unique_names(nodes: list[tuple[str, str]]) -> list[str]:
    """For (name, op) of each node in order: its name, or ``op_index`` where it has none, made
    unique with a suffix."""
    seen: set[str] = set()
    names = []
    for index, (given, op) in enumerate(nodes):
        base = given or f"{op}_{index}"
        name, suffix = base, 1
        while name in seen:
            name, suffix = f"{base}_{suffix}", suffix + 1
        seen.add(name)
        names.append(name)
    return names


def export_like(graph: gs.Graph, original: onnx.ModelProto) -> onnx.ModelProto:
    """Clean up, sort and export ``graph``, keeping the original's opsets, IR version and metadata."""
    graph.cleanup().toposort()
    model = gs.export_onnx(graph, do_type_check=False)
    model.ir_version = original.ir_version
    del model.opset_import[:]
    model.opset_import.extend(original.opset_import)
    for attr in ("producer_name", "producer_version", "domain", "model_version", "doc_string"):
        setattr(model, attr, getattr(original, attr))
    del model.metadata_props[:]
    model.metadata_props.extend(original.metadata_props)
    return model
