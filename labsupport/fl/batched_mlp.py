"""Vectorized clients' fast path: backpropagation written out for chains of Linear and ReLU layers.

What it is. For a model whose forward pass is ``Linear -> ReLU -> ... -> Linear`` (the reference MLP
of MNIST-1D, a logistic regression; an optional ``flatten`` first), :func:`sgd_steps` takes the SGD
steps of :func:`labsupport.fl.vectorized.vectorized_local_updates` for all ``C`` clients at once with
the gradients written out by hand -- backpropagation (Rumelhart, Hinton & Williams 1986) of the mean
cross-entropy, each product batched over the clients (``bmm``; ``W_k[c]`` is client ``c``'s weight).
With ``m[c, j]`` the padding mask and ``n_c`` the real samples of client ``c``'s batch:

    forward      h_0 = x,   z_k = h_{k-1} W_k^T + b_k,   h_k = relu(z_k)   (no ReLU after the last)
    loss         loss_c = sum_j m[c, j] (logsumexp(z_L[c, j]) - z_L[c, j, y]) / max(1, n_c)
    output grad  g_L = (softmax(z_L) - onehot(y)) * m / max(1, n_c)
    backward     g_{k-1} = (g_k W_k) * [z_{k-1} > 0]
    update       W_k <- W_k - lr * g_k^T h_{k-1},    b_k <- b_k - lr * sum_j g_k

-- the equations autograd would follow, in the order it would (every ``g`` is taken with the
weights before the step). A padded slot has ``m = 0`` and adds exactly zero; a client with no
samples left at a step (``n_c = 0``) steps by zero.

Why. It is the same arithmetic as the ``vmap`` path, minus what autograd adds around it: a gradient
tensor per parameter written out and read back for the update (here the weight gradient goes
straight into the weight, ``baddbmm_(..., alpha=-lr)``), its graph bookkeeping, and a softmax
kernel that is slow on 10 classes. And every client starts from the same global weights, so the
first step's products run as single matrix products over all ``C x b`` samples, and its update is
what writes each client's own copy of the weights. ``python -m labsupport.bench vectorized_clients``
measures both ways. Anything else -- another activation, a residual, a convolution, frozen or tied weights --
takes the general ``vmap`` path: :func:`linear_relu_chain` recognises the model from its traced
graph (``torch.fx``), never from its class.
"""

from __future__ import annotations

import weakref
from collections.abc import Mapping
from dataclasses import dataclass

import torch
import torch.fx
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["LinearReLUChain", "linear_relu_chain", "sgd_steps"]

_RELUS = {torch.relu, F.relu, torch.relu_}
_FLATTENS = {torch.flatten}


@dataclass(frozen=True)
class LinearReLUChain:
    """A model's forward pass as a chain: ``flatten`` (or not), then ``layers[k]`` (a Linear's
    name), each followed by a ReLU when ``relu[k]`` -- never the last, whose outputs are the
    logits."""

    flatten: bool
    layers: tuple[str, ...]
    relu: tuple[bool, ...]


def _is_relu(node: torch.fx.Node, modules: Mapping[str, nn.Module]) -> bool:
    if node.op == "call_function" and node.target in _RELUS:
        # F.relu is traced with its ``inplace`` flag; in place or not, the value is the same
        return len(node.args) in (1, 2) and set(node.kwargs) <= {"inplace"}
    if node.op == "call_method" and node.target in ("relu", "relu_"):
        return len(node.args) == 1 and not node.kwargs
    return node.op == "call_module" and type(modules[node.target]) is nn.ReLU


def _is_flatten(node: torch.fx.Node, modules: Mapping[str, nn.Module]) -> bool:
    """``torch.flatten(x, 1)``, ``x.flatten(1)`` or ``nn.Flatten()`` (dims 1 to -1)."""
    if node.op == "call_module":
        m = modules[node.target]
        return type(m) is nn.Flatten and m.start_dim == 1 and m.end_dim == -1
    if (node.op == "call_function" and node.target in _FLATTENS) or (
        node.op == "call_method" and node.target == "flatten"
    ):
        args = list(node.args[1:]) + [
            node.kwargs[k] for k in ("start_dim", "end_dim") if k in node.kwargs
        ]
        return args in ([1], [1, -1])
    return False


#: model -> (what its traced graph depended on, the chain or None): tracing costs about 1.7 ms,
#: a tenth of a 100-client round, and a simulation asks again every round.
_TRACED: weakref.WeakKeyDictionary[nn.Module, tuple[tuple, LinearReLUChain | None]] = (
    weakref.WeakKeyDictionary()
)


def _signature(model: nn.Module) -> tuple:
    """What a traced graph depends on: the module tree (names, objects, classes and their
    forward functions) and any forward assigned on an instance."""
    return tuple(
        (name, id(m), type(m), type(m).forward, m.__dict__.get("forward"))
        for name, m in model.named_modules()
    )


def linear_relu_chain(model: nn.Module) -> LinearReLUChain | None:
    """The model's forward pass as a :class:`LinearReLUChain`, or None if it is anything else
    (the answer is kept per model until its module tree changes; see :func:`_trace_chain`)."""
    signature = _signature(model)
    cached = _TRACED.get(model)
    if cached is not None and cached[0] == signature:
        return cached[1]
    chain = _trace_chain(model)
    _TRACED[model] = (signature, chain)
    return chain


def _trace_chain(model: nn.Module) -> LinearReLUChain | None:
    """The model's forward pass as a :class:`LinearReLUChain`, or None if it is anything else.

    The model is traced with ``torch.fx`` (symbolically: nothing runs); it qualifies only if the
    graph is one input, an optional flatten, then plain ``nn.Linear`` layers each used once, with at
    most one ReLU after each but the last, and the last Linear's output returned as is. A forward
    that cannot be traced (data-dependent control flow) does not qualify.
    """
    try:
        graph = torch.fx.symbolic_trace(model).graph
    except Exception:  # any tracing failure just means "take the general path"
        return None
    modules = dict(model.named_modules())
    nodes = list(graph.nodes)
    if len(nodes) < 3 or nodes[0].op != "placeholder" or nodes[-1].op != "output":
        return None
    if sum(n.op == "placeholder" for n in nodes) != 1:
        return None
    body, out = nodes[1:-1], nodes[-1]
    flatten = bool(body) and _is_flatten(body[0], modules)
    if flatten:
        body = body[1:]
    layers: list[str] = []
    relu: list[bool] = []
    previous = nodes[1] if flatten else nodes[0]
    for node in body:
        if len(node.args) < 1 or node.args[0] is not previous or len(previous.users) != 1:
            return None
        if node.op == "call_module" and type(modules[node.target]) is nn.Linear:
            if len(node.args) != 1 or node.kwargs:
                return None
            layers.append(node.target)
            relu.append(False)
        elif _is_relu(node, modules) and layers and not relu[-1]:
            relu[-1] = True
        else:
            return None
        previous = node
    if not layers or relu[-1] or out.args != (previous,) or len(set(layers)) != len(layers):
        return None
    return LinearReLUChain(flatten, tuple(layers), tuple(relu))


def sgd_steps(
    chain: LinearReLUChain,
    weights: list[Tensor],
    biases: list[Tensor | None],
    x: Tensor,
    y: Tensor,
    rows: Tensor,
    mask: Tensor,
    counts: Tensor,
    lr: float,
) -> tuple[list[Tensor], list[Tensor | None], Tensor]:
    """All steps of all clients from the global model; returns their weights, biases and losses.

    ``weights[k]`` is layer ``k``'s global weight ``(out, in)``, ``biases[k]`` its bias ``(out,)``
    or None. ``x``/``y`` hold every client's samples, ``rows[c, s, j]`` the row of client ``c``'s
    ``j``-th sample at step ``s``, ``mask`` which slots are real and ``counts`` how many per step
    (see :func:`labsupport.fl.vectorized.batch_plan`). Returns every client's weights ``(C, out,
    in)`` and biases ``(C, out)``, new contiguous tensors, and ``sum_s loss_c(s) * n_c(s)`` per
    client in float64 -- the numerator of ``TrainResult.loss``.

    Every client starts from the same global weights, so the first step's forward and backward
    products are single matrix products over all ``C x b`` samples, and its update writes each
    client's own copy (``W - lr * g^T h``) without copying the global weights ``C`` times first.
    """
    num_clients, num_steps, width = rows.shape
    weights, biases = list(weights), list(biases)  # the first step replaces them: not the caller's
    if chain.flatten:
        x = x.flatten(1)
    dtype = weights[0].dtype
    scale = mask.to(dtype) / counts.clamp(min=1)[..., None].to(dtype)  # m / max(1, n_c)
    loss_sum = torch.zeros(num_clients, dtype=torch.float64, device=x.device)
    if num_steps == 0:
        return (
            [w.expand(num_clients, *w.shape).clone() for w in weights],
            [None if b is None else b.expand(num_clients, *b.shape).clone() for b in biases],
            loss_sum,
        )
    # Every step's inputs and labels, gathered at once: xs[c, s] is client c's batch at step s.
    xs = x.index_select(0, rows.flatten()).view(num_clients, num_steps, width, -1)
    ys = y.index_select(0, rows.flatten()).view(num_clients, num_steps, width, 1)
    last = len(weights) - 1
    for s in range(num_steps):
        shared = s == 0  # weights (out, in), the same for every client; later (C, out, in)
        h = xs[:, s]  # (C, b, in)
        inputs, outputs = [], []
        for k, (w, b) in enumerate(zip(weights, biases, strict=True)):
            inputs.append(h)
            if shared:
                z = F.linear(h, w, b)  # one matrix product over all C x b samples
            elif b is None:
                z = torch.bmm(h, w.transpose(1, 2))
            else:
                z = torch.baddbmm(b.unsqueeze(1), h, w.transpose(1, 2))
            if chain.relu[k]:
                z = z.relu_()
            outputs.append(z)
            h = z
        # softmax and cross-entropy over few classes, written out: shift by the max, exponentiate
        shifted = h - h.amax(dim=-1, keepdim=True)
        picked = shifted.gather(-1, ys[:, s])  # z_y - max
        exp = shifted.exp_()
        total = exp.sum(dim=-1, keepdim=True)
        per_sample = total.log().sub_(picked).squeeze(-1)  # (C, b): logsumexp(z) - z_y
        w_s = scale[:, s]
        loss_sum += (per_sample * w_s).sum(dim=1).double() * counts[:, s]
        g = exp.div_(total).scatter_add_(-1, ys[:, s], torch.full_like(ys[:, s], -1, dtype=dtype))
        g = g.mul_(w_s.unsqueeze(-1))  # g_L = (softmax - onehot) * m / n
        grads = [g]
        for k in range(last, 0, -1):  # g_{k-1} = (g_k W_k) * [z_{k-1} > 0], with the old weights
            g = g @ weights[k] if shared else torch.bmm(g, weights[k])
            if chain.relu[k - 1]:
                g = torch.ops.aten.threshold_backward(g, outputs[k - 1], 0)
            grads.append(g)
        grads.reverse()
        for k, (g, h_in) in enumerate(zip(grads, inputs, strict=True)):
            w, b = weights[k], biases[k]
            if shared:  # each client's own copy, written once: W - lr * g^T h
                weights[k] = torch.baddbmm(w.expand(num_clients, *w.shape), g.mT, h_in, alpha=-lr)
                if b is not None:
                    biases[k] = torch.sub(b, g.sum(dim=1), alpha=lr)
            else:
                w.baddbmm_(g.mT, h_in, alpha=-lr)  # the gradient goes straight into w
                if b is not None:
                    b.sub_(g.sum(dim=1), alpha=lr)
    return weights, biases, loss_sum
