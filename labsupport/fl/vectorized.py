"""Train many small-model FL clients at once: FedAvg's local updates vectorized with ``torch.func``.

What it is. :func:`vectorized_local_updates` computes what a loop of
:func:`labsupport.fl.clients.local_update` (plain SGD, no momentum) computes for ``C`` clients -- the
same batches in the same order, the same mean cross-entropy per batch, the same update
``w <- w - lr * grad`` -- but takes each step for all clients in one batched call. It is per-model
vectorization, as in functorch's "model ensembling" tutorial: every parameter gets a new leading
client dimension (``w[c]`` is client ``c``'s copy), and

    torch.func.vmap(torch.func.grad_and_value(loss_of_one_client))

turns the loss of *one* model on *its* batch (written with ``torch.func.functional_call``) into the
losses and gradients of all ``C`` models on their ``C`` batches.

Why. A cross-device simulation (McMahan et al. 2017 use ``K = 100`` clients) with a tiny model
spends most of its time in Python, not in arithmetic: one SGD step of a 40-100-100-10 MLP on 10
samples is microseconds of matrix products inside a fraction of a millisecond of interpreter,
dispatch and optimizer overhead, paid again for every client and every step. One batched step for
100 clients pays that overhead once and hands the arithmetic to a few batched matrix products
(``python -m labsupport.bench vectorized_clients`` measures the ratio: about 5-7x on 2 CPU cores).

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
from torch.func import functional_call, grad_and_value, vmap
from torch.nn.modules.batchnorm import _BatchNorm, _NormBase
from torch.nn.modules.dropout import _DropoutNd
from torch.nn.utils.rnn import pad_sequence

from labsupport.train import batch_indices

__all__ = ["batch_plan", "vectorized_local_updates"]


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
    batches: list[Tensor] = []  # every client's batches, one after the other
    client: list[int] = []  # ... whose they are
    step: list[int] = []  # ... and at which step the client takes them
    for c, (n, seed) in enumerate(zip(sizes, seeds, strict=True)):
        generator = torch.Generator().manual_seed(int(seed))
        plan = [idx for _ in range(epochs) for idx in batch_indices(n, batch_size, generator)]
        batches += plan
        client += [c] * len(plan)
        step += range(len(plan))
    num_clients, num_steps = len(sizes), max(step, default=-1) + 1
    if not batches:
        empty = torch.zeros(num_clients, num_steps, 0, dtype=torch.long)
        return empty, empty.bool()
    padded = pad_sequence(batches, batch_first=True)  # (all batches, b_max), padded with 0
    lengths = torch.tensor([b.shape[0] for b in batches])
    real = torch.arange(padded.shape[1]) < lengths[:, None]  # True for a real sample
    index = torch.zeros(num_clients, num_steps, padded.shape[1], dtype=torch.long)
    mask = torch.zeros(num_clients, num_steps, padded.shape[1], dtype=torch.bool)
    index[client, step] = padded
    mask[client, step] = real
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
    for c, (x, y) in enumerate(data):
        if len(x) != len(y):
            raise ValueError(f"client {c} has {len(x)} inputs but {len(y)} labels")
        if len(x) == 0:
            raise ValueError(f"client {c} has no samples; every client needs at least one to train")
        if y.dim() != 1:
            raise ValueError(
                f"client {c} labels have shape {tuple(y.shape)}; expected class indices of shape (n,)"
            )
        x0, y0 = data[0]
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
) -> tuple[list[dict[str, Tensor]], list[float]]:
    """ClientUpdate of FedAvg (plain SGD) for all clients in ``data`` at once.

    The same result, to float rounding, as calling for every client ``c``
    ``local_update(model, global_state, *data[c], epochs=epochs, batch_size=batch_size, lr=lr,
    seed=seeds[c], optimizer="sgd")``. ``model`` supplies only the forward computation: its own
    weights are ignored and left unchanged. Returns ``(states, losses)``: each client's new state
    dict (parameters trained, buffers copied from ``global_state``) and its mean training loss over
    all steps, weighted by batch size (``TrainResult.loss``). The clients' parameters are views into
    one stacked tensor per parameter (no copy of ``C`` models).
    """
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
    # params[k][c] is client c's copy of parameter k; all start from the global model.
    params = {
        k: global_state[k].detach().expand(num_clients, *global_state[k].shape).clone()
        for k in trainable
    }
    constants = {
        k: global_state[k].detach()
        for k in model.state_dict()
        if k not in trainable and canonical.get(k, k) == k
    }
    device = next(iter(params.values())).device if params else torch.device("cpu")

    # All clients' samples in one tensor; client c's sample j is row offset[c] + j.
    x_all = torch.cat([x for x, _ in data]).to(device)
    y_all = torch.cat([y for _, y in data]).to(device)
    sizes = [len(y) for _, y in data]
    offset = torch.tensor([0, *sizes[:-1]]).cumsum(0)
    index, mask = batch_plan(sizes, epochs=epochs, batch_size=batch_size, seeds=seeds)
    rows = (index + offset[:, None, None]).to(device)  # (C, S, b_max) rows of x_all
    mask = mask.to(device)
    counts = mask.sum(dim=2)  # (C, S): real samples in client c's step s; 0 = no step
    active = counts > 0

    def client_loss(w: dict[str, Tensor], xb: Tensor, yb: Tensor, mb: Tensor) -> Tensor:
        """One client's masked mean loss: sum over real samples / their number (padding adds 0)."""
        logits = functional_call(model, (w, constants), (xb,))
        per_sample = F.cross_entropy(logits, yb, reduction="none")
        return torch.where(mb, per_sample, 0.0).sum() / mb.sum().clamp(min=1)

    # in_dims=0: each client gets its own slice of the parameters, batch and mask.
    step_all = vmap(grad_and_value(client_loss), in_dims=(0, 0, 0, 0))

    loss_sum = torch.zeros(num_clients, dtype=torch.float64, device=device)
    was_training = model.training
    model.train()  # as train() does; without BatchNorm/dropout it changes nothing in the forward
    try:
        for s in range(rows.shape[1]):
            xb, yb, mb = x_all[rows[:, s]], y_all[rows[:, s]], mask[:, s]  # (C, b_max, ...)
            grads, losses = step_all(params, xb, yb, mb)
            for k, w in params.items():
                # w_c <- w_c - lr * a_c * g_c: an inactive client (a_c = 0; g_c = 0 too, its loss
                # being the constant 0) steps by exactly zero. In place: no new C-sized tensor.
                step_size = active[:, s].to(w.dtype).mul(-lr).reshape(-1, *[1] * (w.dim() - 1))
                w.addcmul_(grads[k], step_size)
            loss_sum += losses.detach().double() * counts[:, s]
    finally:
        model.train(was_training)

    total = counts.sum(dim=1).clamp(min=1).double()
    mean_losses = (loss_sum / total).tolist()
    # Client c's parameters are slice c of each stacked tensor (a view: no copy of C models).
    per_client = {k: w.unbind(0) for k, w in params.items()}
    states = []
    for c in range(num_clients):
        state = {}
        for k, v in global_state.items():
            name = canonical.get(k, k)
            state[k] = per_client[name][c] if name in per_client else v.detach().clone()
        states.append(state)
    return states, mean_losses
