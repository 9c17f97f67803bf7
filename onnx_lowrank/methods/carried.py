"""Each layer's input in the already-approximated network (Eq. 12), carried from layer to layer.

Solving shallow to deep, a layer's fitted input is its output in the network whose earlier layers
are already replaced. Re-running the network from its inputs up to each layer costs the whole
prefix every time: about L/2 passes of the network for a chain of L layers (VGG-16's 15 layers:
about seven). Instead, the run that collects a layer's input also keeps the values at the cut
before that layer (the tensors computed before it and read from it on,
``graph.surgery.cut_before``), and the next layer's run starts there: only the part of the
network between two layers runs again, with the layers solved since replaced. Where a cut would
take more than its budget (half of ``--sample-memory``), as the wide early feature maps of many
images do, the next run starts from the last cut kept, or from the inputs. A run from a cut computes what a run from the inputs
would (``tests/test_chains.py`` checks it sample by sample).
"""

from __future__ import annotations

from dataclasses import dataclass

import onnx
from onnx import helper

from onnx_lowrank.graph.rewrite import NodeSpec, replace_units
from onnx_lowrank.graph.surgery import cut_before, prefix_model
from onnx_lowrank.graph.units import Unit
from onnx_lowrank.runtime.sessions import batch_chunks, collect_responses_and_values


@dataclass(frozen=True)
class CutSizes:
    """Bytes per sample of the values at the cut before each layer (where measured:
    ``runtime.shapes.measure_shapes``), and how many bytes one cut may take."""

    per_sample: dict[str, int]
    budget: int


class CarriedCut:
    """The approximated network's values at the cut before the last layer whose input was
    collected (none before the first), batch by batch as ``collect`` runs them; the network's
    inputs are never kept (the calibration source gives them again)."""

    def __init__(self, normalised: onnx.ModelProto, collect: dict, sizes: CutSizes) -> None:
        """A cut whose ``sizes`` exceed the budget is not even fetched."""
        self.normalised, self.collect, self.sizes = normalised, collect, sizes
        self.order = {node.name: index for index, node in enumerate(normalised.graph.node)}
        self.graph_inputs = {i.name: i for i in normalised.graph.input}
        self.chunks = [tuple(chunk) for chunk in batch_chunks(collect["indices"], collect["batch_size"])]
        self.layer: str | None = None
        self.cut: list[str] = []  # the kept cut's names
        self.batches: list[dict] = []

    def layer_output(self, unit: Unit, replaced: dict[str, list[NodeSpec]], shapes: dict) -> tuple:
        """``unit``'s sampled output where the nodes in ``replaced`` (the layers solved before it,
        and its own spatial split) are replaced, and the conv MACs per sample of the part run."""
        from_cut = self.layer is not None and self.order[self.layer] < self.order[unit.name]
        given = self._kept_cut() if from_cut else None
        cut = cut_before(self.normalised, unit.name)
        fed = {i.name for i in (given or self.normalised.graph.input)}
        fits = self.sizes.per_sample.get(unit.name, 0) * len(self.collect["indices"]) <= self.sizes.budget
        computed = [name for name in cut if name not in fed] if fits else []
        # A dense layer's output is its input's product with its weights, in NumPy: the part holds
        # none of them (VGG-16's fc6: 411 MB, copied into the part and again into its session).
        dense = unit.kind == "dense" and unit.name not in replaced and unit.input not in fed
        sampled = unit.input if dense else unit.output
        part = prefix_model(self.normalised, list(dict.fromkeys([sampled, *computed])), given)
        names = {node.name for node in part.graph.node}
        if inside := {name: chain for name, chain in replaced.items() if name in names}:  # none: a copy for nothing
            part = replace_units(part, inside)
        passed = [name for name in cut if name not in computed and name not in self.graph_inputs]
        # Where the next cut is expected to fit, the kept one is let go batch by batch as it is
        # read: one cut in memory at a time, not two.
        source = _CutSource(self, fed & set(self.graph_inputs), passed if computed else None) if from_cut \
            else self.collect["source"]
        responses, batches = collect_responses_and_values(
            part, **{**self.collect, "source": source}, tensors=[sampled], whole=computed,
            whole_bytes=self.sizes.budget, sampled_as={unit.input: unit.output} if dense else None)
        if batches is not None:
            earlier = source.passed if from_cut else [{}] * len(batches)
            self.batches = [{**old, **new} for old, new in zip(earlier, batches)]
            self.layer, self.cut = unit.name, cut
        elif from_cut and computed:  # let go for a cut that proved larger than expected
            self.layer, self.batches = None, []
        output = responses[sampled] @ unit.weight.T + unit.bias if dense else responses[sampled]
        return output, sum(shapes[name].macs for name in names if name in shapes)

    def _kept_cut(self) -> list[onnx.ValueInfoProto]:
        """The kept cut as the inputs of a model, typed as computed (or as the network's inputs)."""
        return [self.graph_inputs[name] if name in self.graph_inputs else helper.make_tensor_value_info(
                    name, helper.np_dtype_to_tensor_dtype(self.batches[0][name].dtype), None)
                for name in self.cut]


class _CutSource:
    """The values at the kept cut for each batch of the collection, with the network's inputs that
    the part run from it reads (from the calibration source). With ``passed`` (the names the
    next cut keeps), each batch is let go once read, but for those values (``self.passed``)."""

    def __init__(self, carried: CarriedCut, graph_inputs: set[str], passed: list[str] | None) -> None:
        self.carried, self.graph_inputs, self.names = carried, graph_inputs, passed
        self.position = {chunk: index for index, chunk in enumerate(carried.chunks)}
        self.passed: list[dict] = [{} for _ in carried.chunks]

    def get(self, chunk) -> dict:
        index = self.position[tuple(chunk)]
        values = self.carried.batches[index]
        if self.names is not None:
            self.passed[index] = {name: values[name] for name in self.names}
            self.carried.batches[index] = {}
        if self.graph_inputs:
            values = {**{n: v for n, v in self.carried.collect["source"].get(chunk).items() if n in self.graph_inputs},
                      **values}
        return values
