"""Train many small-model FL clients at once: FedAvg's local updates vectorized with ``torch.func``.

What it is. :func:`vectorized_local_updates` computes what a loop of
:func:`labsupport.fl.clients.local_update` (plain SGD, no momentum) computes for ``C`` clients -- the
same batches in the same order, the same mean cross-entropy per batch, the same update
``w <- w - lr * grad`` -- but takes each step for all clients in one batched call. It is per-model
vectorization, as in functorch's "model ensembling" tutorial: every parameter gets a new leading
client dimension (``w[c]`` is client ``c``'s copy), and

    torch.func.vmap(functional_call_of_one_model)

turns the forward pass of *one* model on *its* batch (written with ``torch.func.functional_call``)
into the logits of all ``C`` models on their ``C`` batches. The loss is taken on all of them at once,
and one ordinary backward pass gives every client's gradient: client ``c``'s loss depends on its own
``w[c]`` alone, so the gradient of the sum is each client's own gradient.

Why. A cross-device simulation (McMahan et al. 2017 use ``K = 100`` clients) with a tiny model
spends most of its time in Python, not in arithmetic: one SGD step of a 40-100-100-10 MLP on 10
samples is microseconds of matrix products inside a fraction of a millisecond of interpreter,
dispatch and optimizer overhead, paid again for every client and every step. One batched step for
100 clients pays that overhead once and hands the arithmetic to a few batched matrix products.
Both ways still do the same arithmetic, so the gain is bounded by it. For a chain of Linear and ReLU
layers (the reference MLP) the steps take a second path, :mod:`labsupport.fl.batched_mlp`, with the
backpropagation written out and the gradient written straight into the weights; any other model
takes the ``vmap`` path described here. ``python -m labsupport.bench vectorized_clients`` measures
both against the loop.

Clients of different sizes. Client ``c`` has ``n_c`` samples; each epoch it takes ``ceil(n_c / B)``
steps, the last batch possibly short (``B = batch_size``; ``None`` is one full batch per epoch).
To put everyone in one tensor, step ``s`` is padded to ``C x b_max`` sample slots with a mask
``m[c, s, j]`` (1 for a real sample, 0 for padding), and client ``c``'s loss at step ``s`` is

    loss_c(s) = sum_j m[c, s, j] * CE(f(w_c; x[c, s, j]), y[c, s, j]) / max(1, sum_j m[c, s, j])

-- the mean over the real samples of its batch, as ``F.cross_entropy`` takes it; padded slots add
exactly zero to the loss and to its gradient. A client whose batches have run out (fewer samples,
so fewer steps) is *inactive* at step ``s``, ``a[c, s] = 0`` where ``a[c, s] = 1`` if
``sum_j m[c, s, j] > 0``, and takes no step:

    w_c <- w_c - lr * a[c, s] * grad loss_c(s)         (w_c unchanged when a[c, s] = 0)

Limits.

* Plain SGD only (no momentum, no Adam, no proximal ``penalty``), with one ``epochs``,
  ``batch_size`` and ``lr`` for all clients of a call.
* No layer that mixes the samples of a batch or changes buffers in training: BatchNorm (its batch
  statistics would see the padding; its running statistics are buffers the step would change) is
  rejected. Buffers of supported models are constants, shared by all clients and returned unchanged;
  GroupNorm/LayerNorm are per-sample and fine.
* No random layers (dropout): ``vmap`` cannot reproduce the sequential run's random stream.
* Memory grows as ``C x`` (model + one batch of activations): it suits many *small* models. A large
  model gains little, since its own arithmetic already dwarfs Python's overhead.

Chapter 01 uses it through ``FedAvgConfig(vectorized=True)`` (see
:meth:`labsupport.fl.simulation.FedAvgSimulation._train_vectorized`) to simulate 100+ clients
a round.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.func import functional_call, vmap
from torch.nn.modules import module as _module
from torch.nn.modules.batchnorm import _BatchNorm, _NormBase
from torch.nn.modules.dropout import _DropoutNd

from .batched_mlp import LinearReLUChain, linear_relu_chain, sgd_steps

__all__ = ["BLOCK", "batch_plan", "vectorized_local_updates"]

#: The written-out path trains at most this many clients at a time (see vectorized_local_updates).
BLOCK = 64


def batch_plan(
    sizes: Sequence[int], *, epochs: int, batch_size: int | None, seeds: Sequence[int]
) -> tuple[Tensor, Tensor]:
    """Every client's batches for ``epochs`` epochs, padded into one ``(C, S, b_max)`` tensor.

    Client ``c``'s batches are exactly those of :func:`labsupport.train.batch_indices` drawn from
    ``torch.Generator().manual_seed(seeds[c])``, one call per epoch with the same generator -- the
    batch order of :func:`~labsupport.fl.clients.local_update`. ``S`` is the largest number of steps
    of any client and ``b_max`` the largest batch. Returns ``(index, mask)``: ``index[c, s, j]`` is
    a sample index into client ``c``'s data (0 in padded slots) and ``mask[c, s, j]`` is True for a
    real sample, False for padding.
    """
    num_clients = len(sizes)
    # One shuffled order per client and epoch -- the only per-client work, since it must use the
    # client's own generator exactly as batch_indices does; everything after is a few tensor ops.
    orders: list[Tensor] = []
    widths: list[int] = []  # b_c: client c's batch size (its whole data when one full batch)
    for n, seed in zip(sizes, seeds, strict=True):
        full = batch_size is None or batch_size >= n
        generator = torch.Generator().manual_seed(int(seed))
        for _ in range(epochs):
            orders.append(torch.arange(n) if full else torch.randperm(n, generator=generator))
        widths.append(n if full else batch_size)
    n_c = torch.tensor(list(sizes), dtype=torch.long)
    b_c = torch.tensor(widths, dtype=torch.long)
    steps_per_epoch = (n_c + b_c - 1) // b_c.clamp(min=1)  # ceil(n_c / b_c); 0 for an empty client
    num_steps = int((epochs * steps_per_epoch).max()) if num_clients else 0
    b_max = int(b_c[n_c > 0].max()) if num_steps else 0
    index = torch.zeros(num_clients, num_steps, b_max, dtype=torch.long)
    mask = torch.zeros(num_clients, num_steps, b_max, dtype=torch.bool)
    if num_steps == 0:
        return index, mask
    # Element i of the concatenated orders is sample position j of epoch e of client c.
    block = n_c.repeat_interleave(epochs)  # one block per (client, epoch)
    client = torch.arange(num_clients).repeat_interleave(n_c * epochs)
    epoch = torch.arange(epochs).repeat(num_clients).repeat_interleave(block)
    j = torch.arange(int(block.sum())) - (block.cumsum(0) - block).repeat_interleave(block)
    width = b_c[client]
    step = epoch * steps_per_epoch[client] + j // width
    index[client, step, j % width] = torch.cat(orders)
    mask[client, step, j % width] = True
    return index, mask


def _check_model(model: nn.Module) -> None:
    """Reject layers whose training step cannot be vectorized exactly (see the module's limits)."""
    for name, module in model.named_modules():
        where = f"layer {name!r}" if name else "the model"
        if isinstance(module, _BatchNorm) or (
            isinstance(module, _NormBase) and module.track_running_stats
        ):
            raise ValueError(
                f"{where} is a {type(module).__name__}, whose training step updates running-stat buffers "
                "and mixes the samples of a batch; vectorized mode supports models without running-stat "
                "buffers (use GroupNorm/LayerNorm, or FedAvgConfig(vectorized=False))"
            )
        if isinstance(module, _DropoutNd) and module.p > 0:
            raise ValueError(
                f"{where} is a {type(module).__name__}(p={module.p}); random layers cannot be reproduced "
                "by vectorized mode (use p=0, or FedAvgConfig(vectorized=False))"
            )


def _check_data(data: Sequence[tuple[Tensor, Tensor]], seeds: Sequence[int]) -> None:
    if len(data) != len(seeds):
        raise ValueError(
            f"got data for {len(data)} clients but {len(seeds)} seeds; expected one seed per client"
        )
    x0, y0 = data[0] if data else (None, None)
    for c, (x, y) in enumerate(data):  # shape[0], not len(): Tensor.__len__ is a Python call
        if y.dim() != 1:
            raise ValueError(
                f"client {c} labels have shape {tuple(y.shape)}; expected class indices of shape (n,)"
            )
        if x.dim() == 0 or x.shape[0] != y.shape[0]:
            raise ValueError(
                f"client {c} has {len(x) if x.dim() else 0} inputs but {len(y)} labels"
            )
        if y.shape[0] == 0:
            raise ValueError(f"client {c} has no samples; every client needs at least one to train")
        if x.shape[1:] != x0.shape[1:] or x.dtype != x0.dtype or y.dtype != y0.dtype:
            raise ValueError(
                f"client {c} has samples of shape {tuple(x.shape[1:])} ({x.dtype}, labels {y.dtype}); "
                f"client 0 has {tuple(x0.shape[1:])} ({x0.dtype}, labels {y0.dtype}): all must match"
            )


def vectorized_local_updates(
    model: nn.Module,
    global_state: Mapping[str, Tensor],
    data: Sequence[tuple[Tensor, Tensor]],
    *,
    epochs: int,
    batch_size: int | None,
    lr: float,
    seeds: Sequence[int],
    method: str = "auto",
) -> tuple[list[dict[str, Tensor]], list[float]]:
    """ClientUpdate of FedAvg (plain SGD) for all clients in ``data`` at once.

    The same result, to float rounding, as calling for every client ``c``
    ``local_update(model, global_state, *data[c], epochs=epochs, batch_size=batch_size, lr=lr,
    seed=seeds[c], optimizer="sgd")``. ``model`` supplies only the forward computation: its own
    weights are ignored and left unchanged. Returns ``(states, losses)``: each client's new state
    dict (parameters trained, buffers copied from ``global_state``) and its mean training loss over
    all steps, weighted by batch size (``TrainResult.loss``). The clients' parameters are views into
    stacked tensors (no copy of ``C`` models): one per parameter, or per parameter and block of at
    most :data:`BLOCK` clients on the written-out path.

    ``method``: ``"vmap"`` takes every step with ``vmap`` and autograd (any supported model);
    ``"linear_relu"`` with the backpropagation written out in
    :mod:`labsupport.fl.batched_mlp` (only a chain of Linear and ReLU layers, all trained; a
    ValueError says why another model does not qualify); ``"auto"`` (default) takes the second
    wherever it applies. Both compute the same steps.
    """
    if method not in ("auto", "vmap", "linear_relu"):
        raise ValueError(f"method must be 'auto', 'vmap' or 'linear_relu', got {method!r}")
    _check_data(data, seeds)
    if isinstance(epochs, bool) or not isinstance(epochs, int) or epochs < 0:
        raise ValueError(f"epochs must be an integer >= 0, got {epochs!r}")
    if batch_size is not None and (
        isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1
    ):
        raise ValueError(
            f"batch_size must be a positive integer or None (full batch), got {batch_size!r}"
        )
    if not (isinstance(lr, (int, float)) and math.isfinite(lr)):
        raise ValueError(f"lr must be a finite number, got {lr!r}")
    _check_model(model)
    expected = model.state_dict().keys()
    missing = [k for k in expected if k not in global_state]
    unexpected = [k for k in global_state if k not in expected]
    if missing or unexpected:
        raise ValueError(
            f"global_state does not fit the model: missing {missing}, unexpected {unexpected}"
        )
    if len(data) == 0:
        return [], []

    # Parameters are trained (stacked along a new client dimension 0); everything else -- buffers
    # and frozen parameters -- is one shared constant.
    # Tied parameters (one tensor under two names) are trained once, under the first name.
    canonical: dict[str, str] = {}  # state-dict name -> name of the parameter it is
    first_name: dict[int, str] = {}
    trainable: list[str] = []
    for name, p in model.named_parameters(remove_duplicate=False):
        canonical[name] = first_name.setdefault(id(p), name)
        if canonical[name] == name and p.requires_grad:
            trainable.append(name)
    num_clients = len(data)
    constants = {
        k: global_state[k].detach()
        for k in model.state_dict()
        if k not in trainable and canonical.get(k, k) == k
    }
    device = global_state[trainable[0]].device if trainable else torch.device("cpu")

    # All clients' samples in one tensor; client c's sample j is row offset[c] + j.
    x_all = torch.cat([x for x, _ in data]).to(device)
    y_all = torch.cat([y for _, y in data]).to(device)
    sizes = [y.shape[0] for _, y in data]
    offset = torch.tensor([0, *sizes[:-1]]).cumsum(0)
    index, mask = batch_plan(sizes, epochs=epochs, batch_size=batch_size, seeds=seeds)
    rows = (index + offset[:, None, None]).to(device)  # (C, S, b_max) rows of x_all
    mask = mask.to(device)
    counts = mask.sum(dim=2)  # (C, S): real samples in client c's step s; 0 = no step
    chain = _fast_chain(model, method, trainable, global_state, x_all, y_all)
    per_client: dict[str, list[Tensor]] = {k: [] for k in trainable}
    if chain is not None:  # Linear/ReLU chains: backpropagation written out (batched_mlp)
        # In blocks of at most BLOCK clients: each block takes all its steps while its weights are
        # still in the cache (100 clients' copies of the reference MLP are 6 MB, 1,000 are 60 MB).
        num_blocks = -(-num_clients // BLOCK)
        size = -(-num_clients // num_blocks)  # balanced: 100 clients are two blocks of 50
        losses = []
        with torch.no_grad():
            for start in range(0, num_clients, size):
                block = slice(start, start + size)
                weights, biases, loss_sum = sgd_steps(
                    chain,
                    [global_state[f"{name}.weight"].detach() for name in chain.layers],
                    [_get(global_state, f"{name}.bias") for name in chain.layers],
                    x_all, y_all, rows[block], mask[block], counts[block], lr,
                )  # fmt: skip
                for name, w, b in zip(chain.layers, weights, biases, strict=True):
                    per_client[f"{name}.weight"].extend(w.unbind(0))
                    if b is not None:
                        per_client[f"{name}.bias"].extend(b.unbind(0))
                losses.append(loss_sum)
        loss_sum = torch.cat(losses)
    else:
        # params[k][c] is client c's copy of parameter k; all start from the global model.
        params = {
            k: global_state[k].detach().expand(num_clients, *global_state[k].shape).clone()
            for k in trainable
        }
        params, loss_sum = _vmap_steps(
            model, params, constants, global_state, x_all, y_all, rows, mask, counts, lr
        )
        # Client c's parameters are slice c of each stacked tensor: views, after at most one copy
        # of each (contiguous() undoes the gradient layout _relayout chose; a no-op otherwise).
        for k, w in params.items():
            per_client[k].extend(w.contiguous().unbind(0))

    total = counts.sum(dim=1).clamp(min=1).double()
    mean_losses = (loss_sum / total).tolist()
    states = []
    for c in range(num_clients):
        state = {}
        for k, v in global_state.items():
            name = canonical.get(k, k)
            state[k] = per_client[name][c] if name in per_client else v.detach().clone()
        states.append(state)
    return states, mean_losses


def _get(state: Mapping[str, Tensor], key: str) -> Tensor | None:
    return state[key].detach() if key in state else None


def _fast_chain(
    model: nn.Module,
    method: str,
    trainable: list[str],
    global_state: Mapping[str, Tensor],
    x_all: Tensor,
    y_all: Tensor,
) -> LinearReLUChain | None:
    """The model as a Linear/ReLU chain that :func:`~labsupport.fl.batched_mlp.sgd_steps` can train
    exactly as the ``vmap`` path would, or None (``method="auto"``) -- ValueError with the reason
    when ``method="linear_relu"`` asked for it."""
    if method == "vmap":
        return None
    chain, why = linear_relu_chain(model), ""
    if chain is None:
        why = "its forward pass is not a chain of nn.Linear and ReLU layers (traced with torch.fx)"
    else:
        layers = [model.get_submodule(name) for name in chain.layers]
        names = {
            f"{n}.{p}"
            for n, layer in zip(chain.layers, layers, strict=True)
            for p, _ in layer.named_parameters()
        }
        first = global_state[f"{chain.layers[0]}.weight"]
        width = (
            x_all.flatten(1).shape[1]
            if chain.flatten
            else (x_all.shape[1] if x_all.dim() == 2 else None)
        )
        if set(trainable) != names:
            why = f"it trains {sorted(trainable)}, not exactly the chain's weights and biases {sorted(names)}"
        elif (
            any(m._forward_hooks or m._forward_pre_hooks for m in model.modules())
            or _module._global_forward_hooks
            or _module._global_forward_pre_hooks
        ):
            why = "it has forward hooks, which the written-out pass would not call"
        elif y_all.dtype != torch.long:  # cross_entropy's own check (Long or Byte) stays in charge
            why = f"its labels are {y_all.dtype}, not int64 class indices"
        elif x_all.dtype != first.dtype or width != first.shape[1]:
            why = f"its inputs {tuple(x_all.shape[1:])} ({x_all.dtype}) do not fit the first layer {tuple(first.shape)} ({first.dtype}) without reshaping"
    if why and method == "linear_relu":
        raise ValueError(
            f"method='linear_relu' cannot train this model: {why}; use method='auto' or 'vmap'"
        )
    return None if why else chain


def _vmap_steps(
    model: nn.Module,
    params: dict[str, Tensor],
    constants: dict[str, Tensor],
    global_state: Mapping[str, Tensor],
    x_all: Tensor,
    y_all: Tensor,
    rows: Tensor,
    mask: Tensor,
    counts: Tensor,
    lr: float,
) -> tuple[dict[str, Tensor], Tensor]:
    """The general path: every step of every client with ``vmap`` over the forward pass and one
    autograd backward. Returns the trained stacked parameters (possibly re-laid out, see
    :func:`_relayout`) and each client's summed loss (float64)."""
    active = counts > 0
    device = x_all.device

    def client_logits(w: dict[str, Tensor], xb: Tensor) -> Tensor:
        """One client's model on its batch: ``f(w_c; x[c, s])``."""
        return functional_call(model, (w, constants), (xb,))

    # in_dims=0: each client gets its own slice of the parameters and of the batch. vmap batches
    # the forward pass only: the loss is taken outside it, on all C x b_max logits at once (under
    # vmap, cross_entropy runs as a Python decomposition), and one ordinary backward through the
    # batched graph gives every client's gradient at once, since client c's loss depends on its own
    # slice w[c] alone: d(sum_c loss_c)/d w[c] = d loss_c / d w[c]. (vmap(grad_and_value(...)) of a
    # one-client loss computes the same, with functorch's transform paid again on every op of the
    # backward: about 1.5x slower per step here.)
    logits_all = vmap(client_logits, in_dims=(0, 0))
    # Steps where every client trains need no per-client mask on the update (below).
    everyone = active.all(dim=0).tolist()

    loss_sum = torch.zeros(rows.shape[0], dtype=torch.float64, device=device)
    was_training = model.training
    model.train()  # as train() does; without BatchNorm/dropout it changes nothing in the forward
    weights = list(params.values())
    for w in weights:
        w.requires_grad_(True)
    try:
        for s in range(rows.shape[1]):
            xb, yb, mb = x_all[rows[:, s]], y_all[rows[:, s]], mask[:, s]  # (C, b_max, ...)
            logits = logits_all(params, xb)  # (C, b_max, classes)
            per_sample = F.cross_entropy(
                logits.flatten(0, 1), yb.flatten(0, 1), reduction="none"
            ).view(mb.shape)
            # loss_c(s): the mean over client c's real samples; padded slots add exactly 0
            losses = torch.where(mb, per_sample, 0.0).sum(dim=1) / counts[:, s].clamp(min=1)
            grads = torch.autograd.grad(losses.sum(), weights) if weights else ()
            if s == 0:  # lay each parameter out in memory as its gradient comes (see _relayout)
                weights = [
                    _relayout(w, g, global_state[k])
                    for (k, w), g in zip(params.items(), grads, strict=True)
                ]
                params = dict(zip(params, weights, strict=True))
            with torch.no_grad():
                if everyone[s]:  # w <- w - lr * g for every client, in one fused call
                    torch._foreach_add_(weights, grads, alpha=-lr)
                else:
                    for w, g in zip(weights, grads, strict=True):
                        # w_c <- w_c - lr * a_c * g_c: an inactive client (a_c = 0; g_c = 0 too,
                        # its loss being the constant 0) steps by exactly zero.
                        step_size = active[:, s].to(w.dtype).mul(-lr)
                        w.addcmul_(g, step_size.reshape(-1, *[1] * (w.dim() - 1)))
            loss_sum += losses.detach().double() * counts[:, s]
    finally:
        model.train(was_training)
        for w in weights:
            w.requires_grad_(False)
    return params, loss_sum


def _relayout(w: Tensor, g: Tensor, start: Tensor) -> Tensor:
    """``w`` -- every client's copy of one parameter, all still equal to ``start`` (the global
    model's) -- as a new leaf laid out in memory as its gradient ``g``.

    Autograd hands back a batched linear layer's weight gradient transposed in memory (strides
    ``(o*i, 1, o)`` for a ``(C, o, i)`` weight); ``w - lr * g`` over two differently laid-out
    tensors then walks one of them against the cache, which cost more per step than the
    forward pass. Matching layouts once, before the first update, makes every update a contiguous
    sweep. The forward pass reads ``w`` through ``functional_call`` and works with any strides.
    """
    if w.stride() == g.stride():
        return w
    # g's dimensions from outermost to innermost in memory; the client dimension must be outermost
    order = sorted(range(g.dim()), key=lambda d: (-g.stride(d), d))
    if order[0] != 0:
        return w
    # Permute the one small global tensor into that order, repeat it for every client (plain
    # row copies), and view the result back in the parameter's shape: g's strides, no strided
    # sweep over C copies.
    small = start.detach().to(g.dtype).permute([d - 1 for d in order[1:]]).contiguous()
    laid_out = small.expand(g.shape[0], *small.shape).contiguous()
    laid_out = laid_out.permute(sorted(range(g.dim()), key=order.__getitem__))
    if laid_out.shape != g.shape or laid_out.stride() != g.stride():
        return w  # g is not dense (overlapping or with gaps): keep w as it is
    return laid_out.requires_grad_(True)
