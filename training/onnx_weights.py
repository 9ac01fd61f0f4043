"""Take a shipped pack's weights back into its torch net, to fine-tune it or wrap it in a new graph.

The exporters fold each BatchNorm that follows a convolution into that convolution's weight and
bias (``do_constant_folding``), and the folded tensors lose their names (``onnx::Conv_N``). This
module walks the graph's convolutions in execution order beside the net's ``Conv2d`` modules in
registration order (the same order for the nets of training/nets_lines.py), copies the named
tensors by name, and puts each folded pair back as convolution + BatchNorm: the BatchNorm's running
statistics are measured on sample inputs and its affine part set so that it undoes them, so the net
computes exactly what the ONNX graph computes in eval mode and about the same in train mode (batch
statistics near the running ones): fine-tuning starts where the shipped model is.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np


class WeightRecoveryError(RuntimeError):
    """The ONNX graph does not fit the torch net; the message says where."""


def _conv_nodes(graph):
    return [n for n in graph.node if n.op_type == "Conv"]


def load_from_onnx(net, onnx_path: Path, sample, wrapper, prefix: str = "net.") -> float:
    """Load ``onnx_path``'s weights into ``net`` (in place) and return the largest difference between
    the graph's first output and ``wrapper``'s (the exported module around ``net``, eval mode) on
    ``sample`` (a uint8 batch the graph takes). ``prefix`` is the wrapper's attribute name the
    exporter put before the net's names."""
    import onnx
    import onnxruntime as ort
    import torch
    from onnx import numpy_helper
    from torch import nn

    onnx_path = Path(onnx_path)
    model = onnx.load(str(onnx_path))
    inits = {i.name: numpy_helper.to_array(i) for i in model.graph.initializer}
    for node in model.graph.node:  # folded weights used more than once may come as Constant nodes
        if node.op_type == "Constant" and node.attribute and node.attribute[0].name == "value":
            inits.setdefault(node.output[0], numpy_helper.to_array(node.attribute[0].t))
    for node in model.graph.node:  # ... or through Identity nodes
        if node.op_type == "Identity" and node.input[0] in inits:
            inits.setdefault(node.output[0], inits[node.input[0]])
    state = net.state_dict()
    with torch.no_grad():
        for name, value in inits.items():  # tensors that kept their names (unfolded layers, heads, deform conv)
            if name.startswith(prefix) and name[len(prefix):] in state:
                key = name[len(prefix):]
                if tuple(state[key].shape) != value.shape and value.size == state[key].numel():
                    value = value.reshape(state[key].shape)
                if tuple(state[key].shape) != value.shape:
                    raise WeightRecoveryError(f"{onnx_path.name}: {name} is {value.shape}, the net's {key} is "
                                              f"{tuple(state[key].shape)}")
                state[key].copy_(torch.from_numpy(np.array(value)))
        modules = dict(net.named_modules())
        convs = [(n, m) for n, m in net.named_modules() if isinstance(m, nn.Conv2d)]
        nodes = _conv_nodes(model.graph)
        def same(a, b) -> bool:
            return len(a.input) == len(b.input) and all(
                x == y or (x in inits and y in inits and np.array_equal(inits[x], inits[y]))
                for x, y in zip(a.input[1:], b.input[1:]))

        if len(convs) and len(nodes) > len(convs) and len(nodes) % len(convs) == 0 and all(
                same(nodes[i], nodes[i % len(convs)]) for i in range(len(nodes))):
            nodes = nodes[:len(convs)]  # the same net run several times in one graph (wafer's symmetries)
        if len(nodes) != len(convs):
            raise WeightRecoveryError(f"{onnx_path.name}: {len(nodes)} Conv nodes, the net has {len(convs)} Conv2d")
        folded = []
        for (name, conv), node in zip(convs, nodes):
            w = inits[node.input[1]]
            if w.shape != tuple(conv.weight.shape):
                raise WeightRecoveryError(f"{onnx_path.name}: Conv node {node.name} weight {w.shape} does not fit "
                                          f"{name} {tuple(conv.weight.shape)}")
            b = inits[node.input[2]] if len(node.input) > 2 else None
            conv.weight.copy_(torch.from_numpy(np.array(w)))
            if conv.bias is not None:
                if b is None:
                    raise WeightRecoveryError(f"{onnx_path.name}: {name} has a bias, node {node.name} has none")
                conv.bias.copy_(torch.from_numpy(np.array(b)))
                continue
            parent, _, idx = name.rpartition(".")
            bn = modules.get(f"{parent}.{int(idx) + 1}") if idx.isdigit() else None
            if not isinstance(bn, nn.BatchNorm2d):
                raise WeightRecoveryError(f"{onnx_path.name}: {name} has no bias and no BatchNorm after it")
            bias = np.zeros(conv.out_channels, np.float32) if b is None else np.array(b)
            # first the exact folded form: BN(x) = x + b
            bn.running_mean.zero_()
            bn.running_var.fill_(1.0 - bn.eps)
            bn.weight.fill_(1.0)
            bn.bias.copy_(torch.from_numpy(bias))
            folded.append((conv, bn, bias))
        # then the statistics the BNs would have seen, measured at the (exact) folded net's conv outputs
        seen: dict[int, list] = {id(c): [] for c, _, _ in folded}
        hooks = [c.register_forward_hook(lambda m, i, o: seen[id(m)].append(o.detach())) for c, _, _ in folded]
        net.eval()
        x = torch.from_numpy(np.ascontiguousarray(sample))
        net(x)
        for h in hooks:
            h.remove()
        for conv, bn, bias in folded:
            o = torch.cat(seen[id(conv)])
            mu, var = o.mean(dim=(0, 2, 3)), o.var(dim=(0, 2, 3), unbiased=False)
            bn.running_mean.copy_(mu)
            bn.running_var.copy_(var)
            bn.weight.copy_(torch.sqrt(var + bn.eps))
            bn.bias.copy_(mu + torch.from_numpy(bias))
        sess = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
        ref = sess.run(None, {sess.get_inputs()[0].name: np.ascontiguousarray(sample)})[0]
        wrapper.eval()
        got = wrapper(x)
        got = got[0] if isinstance(got, (tuple, list)) else got
        return float(np.abs(got.numpy() - ref).max())
