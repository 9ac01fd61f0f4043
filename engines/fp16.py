"""FP32 ONNX -> mixed-precision FP16 ONNX, the graph TensorRT builds from.

Since TensorRT 11 precision lives in the graph (strongly typed networks, no BuilderFlag.FP16;
docs/engines.md), so this module decides which ops run in FP16. It uses
onnxconverter-common's ``convert_float_to_float16`` (light, CPU-only) and keeps in FP32:

- the converter's own ``DEFAULT_OP_BLOCK_LIST`` (Resize, TopK, ...). Passing a list *replaces*
  the default, and then Resize's ``scales`` initializer becomes FP16 and the model is invalid,
  so ours always extends it;
- normalisation and reduction ops (``FP32_OPS``): LayerNorm/InstanceNorm/GroupNorm and the
  Reduce*/Pow/Sqrt a decomposed norm is made of overflow or lose precision in FP16
  (NVIDIA/TensorRT#2564, #3101, #2691). BatchNormalization is left out on purpose: in an exported
  eval model it is a per-channel affine op (usually folded into the Conv), and blocking it would
  put casts around every conv; add it with ``keep_fp32`` when a model needs it;
- the input normalisation chain (uint8 ``image`` -> [Slice/Transpose/Concat: flips, views] -> Cast ->
  AveragePool/Div/Sub/Mul/Add by constants): the input stays uint8 and ``(x/255 - mean)/std`` is
  computed in FP32, then cast once;
- the final Sigmoid/Softmax of every output and any shape-only ops after it, so the
  probabilities the thresholds were calibrated on are computed in FP32;
- whatever the caller names in ``keep_fp32`` (op types or node names).

Graph outputs stay float32 (``keep_io_types``) and the input stays uint8; ``convert`` checks both
and that ONNX Runtime can load the result (``onnx.checker`` alone passes graphs whose node types
disagree, which TensorRT's parser then refuses).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import structlog

from engines.atomic import write_atomic

log = structlog.get_logger(__name__)

# Normalisation and reduction ops kept in FP32 on top of the converter's default block list.
FP32_OPS: tuple[str, ...] = (
    "InstanceNormalization",
    "LayerNormalization",
    "GroupNormalization",
    "LpNormalization",
    "MeanVarianceNormalization",
    "ReduceMean",
    "ReduceSum",
    "ReduceSumSquare",
    "ReduceL1",
    "ReduceL2",
    "ReduceLogSum",
    "ReduceLogSumExp",
    "ReduceProd",
    "GlobalAveragePool",
    "GlobalLpPool",
    "Pow",
    "Sqrt",
    "Softmax",
    "LogSoftmax",
)
# Ops whose output is the final probability.
_FINAL_ACTIVATIONS = {"Sigmoid", "Softmax", "LogSoftmax"}
# Ops that only move, reshape or resample values between the final activation and an output.
_SHAPE_ONLY = {"Identity", "Reshape", "Flatten", "Squeeze", "Unsqueeze", "Transpose", "Resize", "Upsample"}
# Elementwise ops that make up the input normalisation right after the uint8 input.
# AveragePool: a gate that pools the raw image before normalising it (training/nets.py) has it in
# the chain; pooling before the first conv stays FP32 like the normalisation it precedes.
_NORMALISE = {"Cast", "Div", "Sub", "Mul", "Add", "Identity", "AveragePool"}
# Ops that only move the input's pixels (flips as negative-step Slices, transposes, the batch Concat
# of a graph with test-time flips; the wafer pack's symmetric views): on the uint8 input they stay in
# the input chain, before its Cast.
_MOVE = {"Slice", "Concat", "Transpose"}


class FP16Error(RuntimeError):
    """The FP16 conversion failed or produced a model that breaks the model contract."""


@dataclass(frozen=True)
class FP16Recipe:
    """What decides the precision of every node; recorded in the engine manifest."""

    keep_fp32: tuple[str, ...] = ()  # extra op types or node names to keep in FP32

    def op_block_list(self, model_ops: set[str]) -> list[str]:
        from onnxconverter_common import float16

        extra = [name for name in self.keep_fp32 if name in model_ops]
        return list(dict.fromkeys([*float16.DEFAULT_OP_BLOCK_LIST, *FP32_OPS, *extra]))

    def to_dict(self) -> dict:
        from importlib.metadata import version

        return {
            "converter": f"onnxconverter-common {version('onnxconverter-common')}",
            "fp32_ops": list(FP32_OPS),
            "keep_fp32": list(self.keep_fp32),
        }


@dataclass
class FP16Result:
    path: Path
    blocked_nodes: list[str] = field(default_factory=list)  # nodes kept in FP32 by name
    fp32_node_count: int = 0
    fp16_node_count: int = 0


def _name_nodes(graph) -> None:
    """The converter names its casts after the node; unnamed nodes would collide (SSA error)."""
    seen: set[str] = set()
    for i, node in enumerate(graph.node):
        if not node.name or node.name in seen:
            node.name = f"{node.op_type}_{i}_coilsight"
        seen.add(node.name)


def _constants(graph) -> set[str]:
    names = {init.name for init in graph.initializer}
    names.update(out for node in graph.node if node.op_type == "Constant" for out in node.output)
    return names


def input_chain(graph) -> list[str]:
    """Names of the nodes that move, cast and normalise the uint8 input before the first real op: a
    node of _NORMALISE or _MOVE whose inputs are all constants or outputs of the chain (the input's
    flips and their Concat in a test-time-augmented graph, training.nets.FlipTTA, then the Cast and
    the normalisation). ONNX keeps nodes in topological order, so one pass finds them all."""
    consts = _constants(graph)
    # the exporter passes a repeated constant (mean == std, say) through an Identity: still a constant,
    # and that Identity must stay FP32 with the chain it feeds
    const_identity: dict[str, str] = {}
    for node in graph.node:
        if node.op_type == "Identity" and node.input and node.input[0] in consts:
            consts.update(node.output)
            const_identity.update({out: node.name for out in node.output})
    tensors = {inp.name for inp in graph.input if inp.name not in consts}
    chain: list[str] = []
    for node in graph.node:
        inputs = [i for i in node.input if i]
        if (node.op_type in _NORMALISE | _MOVE and any(i in tensors for i in inputs)
                and all(i in tensors or i in consts for i in inputs)):
            chain.extend(const_identity[i] for i in inputs if i in const_identity and const_identity[i] not in chain)
            chain.append(node.name)
            tensors.update(node.output)
    return chain


def output_tails(graph) -> list[str]:
    """Names of the final Sigmoid/Softmax of each output and the shape-only ops after it."""
    producer = {out: node for node in graph.node for out in node.output}
    tails: list[str] = []
    for output in graph.output:
        path = []
        node = producer.get(output.name)
        while node is not None and node.op_type in _SHAPE_ONLY:
            path.append(node.name)
            node = producer.get(node.input[0]) if node.input else None
        if node is not None and node.op_type in _FINAL_ACTIVATIONS:
            tails.extend([*path, node.name])
    return list(dict.fromkeys(tails))


def _restore_float_outputs(graph) -> None:
    """A blocked final node gets a Cast-to-FP16 after it that the converter then makes the graph
    output; drop that cast so the output stays float32 (keep_io_types)."""
    from onnx import TensorProto

    outputs = {o.name: o for o in graph.output}
    for node in list(graph.node):
        if node.op_type != "Cast" or not node.output or node.output[0] not in outputs:
            continue
        to = next((a.i for a in node.attribute if a.name == "to"), None)
        if to != TensorProto.FLOAT16:
            continue
        source = node.input[0]
        for upstream in graph.node:
            for i, name in enumerate(upstream.output):
                if name == source:
                    upstream.output[i] = node.output[0]
        graph.node.remove(node)
        for vi in [v for v in graph.value_info if v.name in (source, node.output[0])]:
            graph.value_info.remove(vi)
        outputs[node.output[0]].type.tensor_type.elem_type = TensorProto.FLOAT


def _check_outputs(model, source_path: Path) -> None:
    from onnx import TensorProto

    for out in model.graph.output:
        if out.type.tensor_type.elem_type != TensorProto.FLOAT:
            raise FP16Error(f"{source_path}: output {out.name!r} must stay float32 after FP16 conversion")


def _check_loads(model, source_path: Path) -> None:
    """ONNX Runtime type-checks every node on load: a Cast whose output the converter retyped, say."""
    import onnxruntime as ort

    try:
        ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    except Exception as exc:  # ORT raises its own Fail/InvalidGraph types
        raise FP16Error(f"{source_path}: the FP16 model does not load in ONNX Runtime: {exc}") from exc


def convert(source: str | Path, dest: str | Path, recipe: FP16Recipe = FP16Recipe()) -> FP16Result:
    """Write the mixed-precision FP16 version of ``source`` to ``dest`` and return what was kept FP32."""
    import onnx
    from google.protobuf.message import DecodeError
    from onnxconverter_common import float16

    source, dest = Path(source), Path(dest)
    try:
        model = onnx.load(str(source))
    except (OSError, DecodeError) as exc:
        raise FP16Error(f"{source}: cannot load ONNX model: {exc}") from exc
    weights = {init.name for init in model.graph.initializer}  # IR < 4 lists them as inputs too
    for inp in model.graph.input:
        if inp.name not in weights and inp.type.tensor_type.elem_type != onnx.TensorProto.UINT8:
            raise FP16Error(
                f"{source}: input {inp.name!r} is {onnx.TensorProto.DataType.Name(inp.type.tensor_type.elem_type)}, "
                "the model contract wants uint8 with normalisation inside the graph"
            )
    graph = model.graph
    _name_nodes(graph)
    model_ops = {n.op_type for n in graph.node}
    names = {n.name for n in graph.node}
    unknown = [k for k in recipe.keep_fp32 if k not in model_ops and k not in names]
    if unknown:
        log.warning("fp16_keep_fp32_not_in_model", model=str(source), names=unknown)
    block_nodes = list(dict.fromkeys([*input_chain(graph), *output_tails(graph),
                                      *(k for k in recipe.keep_fp32 if k in names)]))
    op_block = recipe.op_block_list(model_ops)
    model = onnx.shape_inference.infer_shapes(model)
    converted = float16.convert_float_to_float16(
        model, keep_io_types=True, op_block_list=op_block, node_block_list=block_nodes
    )
    _restore_float_outputs(converted.graph)
    _check_outputs(converted, source)
    try:
        onnx.checker.check_model(converted)
    except onnx.checker.ValidationError as exc:
        raise FP16Error(f"{source}: the FP16 conversion produced an invalid model: {exc}") from exc
    _check_loads(converted, source)
    dest.parent.mkdir(parents=True, exist_ok=True)
    write_atomic(dest, converted.SerializeToString())
    fp32 = sum(1 for n in converted.graph.node if n.op_type in op_block or n.name in block_nodes)
    result = FP16Result(dest, blocked_nodes=block_nodes, fp32_node_count=fp32,
                        fp16_node_count=sum(1 for n in converted.graph.node if n.op_type != "Cast") - fp32)
    log.info("fp16_converted", source=str(source), dest=str(dest), fp32_nodes=result.fp32_node_count,
             fp16_nodes=result.fp16_node_count, blocked_by_name=len(block_nodes))
    return result
