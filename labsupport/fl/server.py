"""The FedAvg server, simulated in one process: rounds, the update pipeline, history, checkpoints.

The server loop of McMahan et al. (2017), Algorithm 1: each round select ``S_t``
(:mod:`labsupport.fl.selection`), hand every selected client its own copy of the global model and a
:class:`~labsupport.fl.clients.RoundContext`, validate what comes back, pass each update through the
update pipeline (:mod:`labsupport.fl.transforms`: compression, DP clipping, masking), aggregate the
accepted replies (:mod:`labsupport.fl.aggregators`; FedAvg's sample-weighted mean by default),
finalize (server-side DP noise), evaluate, record (:mod:`labsupport.fl.history`), checkpoint
(:mod:`labsupport.fl.checkpoint`). It costs little more than the local training it runs
(``python -m labsupport.bench sim_overhead`` measures the ratio): an empty pipeline serializes
nothing, one scratch model is reused for our own clients, and the batch order of every client in every
round is derived from ``(seed, round, client)`` -- so a run killed at round k and resumed from its
checkpoint ends with exactly the model of an uninterrupted run.

No client can harm the run. A client that raises, replies with garbage, fails validation, or sends an
update a transform cannot encode or decode is rejected with a reason (the round's ``rejected``) and
the round goes on; a round with no valid update keeps the global model. Clients only ever see copies.
Sample counts are claims: :class:`~labsupport.fl.aggregators.CountPolicy` decides the weights.
"""

from __future__ import annotations

import copy
import dataclasses
import logging
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn
from tqdm.auto import tqdm

from labsupport.device import get_device
from labsupport.train import evaluate

from .aggregators import Aggregator, CountPolicy, WeightedMean
from .checkpoint import CheckpointError, load_checkpoint, save_checkpoint
from .clients import (
    Client,
    DataClient,
    FitReply,
    Rejection,
    RoundContext,
    TrainConfig,
    fit_or_reject,
    num_local_steps,
)
from .history import History, RoundRecord
from .selection import client_seed, select_clients
from .serialize import deserialize, payload_nbytes, serialize
from .state import (
    StateDict,
    UpdateRejected,
    apply_delta,
    check_weight,
    clone_state,
    state_delta,
    validate_update,
)
from .transforms import Pipeline, RoundAborted, UpdateTransform

__all__ = ["CHECKPOINT_NAME", "FedAvgConfig", "FedAvgSimulation"]

logger = logging.getLogger("labsupport.fl")

CHECKPOINT_NAME = "checkpoint.safetensors"
#: The id the server's own (client-independent) randomness is derived with: no client has it.
SERVER_ID = 2**32 - 1


@dataclass(frozen=True)
class FedAvgConfig:
    """The knobs of Algorithm 1, named as in the paper where it names them.

    The server's own (``num_rounds``, ``fraction_train``, ``eval_every``, ...) and the clients'
    (``local_epochs``, ``batch_size``, ``lr``, ...; :meth:`train_config` is what a client receives).
    """

    num_rounds: int = 20
    fraction_train: float = 0.1  # C: fraction of clients selected per round
    min_train_clients: int = 1
    local_epochs: int = 1  # E
    batch_size: int | None = 10  # B; None = the whole local dataset (B = inf, FedSGD)
    lr: float = 0.05
    optimizer: str = "sgd"
    momentum: float = 0.0
    seed: int = 0
    eval_every: int = 1  # evaluate the global model every this many rounds (and at the last)
    vectorized: bool = False  # train plain DataClients together with torch.func.vmap

    def __post_init__(self) -> None:
        if self.num_rounds < 0:
            raise ValueError(f"num_rounds must be >= 0, got {self.num_rounds}")
        if not 0.0 < self.fraction_train <= 1.0:
            raise ValueError(f"fraction_train must be in (0, 1], got {self.fraction_train}")
        if self.eval_every < 1:
            raise ValueError(f"eval_every must be >= 1, got {self.eval_every}")
        self.train_config()  # validates the client-side knobs
        if self.vectorized and (self.optimizer != "sgd" or self.momentum != 0.0):
            raise ValueError(
                f"vectorized=True trains with plain SGD; got optimizer={self.optimizer!r}, "
                f"momentum={self.momentum}. Use optimizer='sgd', momentum=0 or vectorized=False"
            )

    def train_config(self) -> TrainConfig:
        """The client-side part: what every client's ``fit`` receives."""
        return TrainConfig(
            local_epochs=self.local_epochs,
            batch_size=self.batch_size,
            lr=self.lr,
            optimizer=self.optimizer,
            momentum=self.momentum,
        )


class FedAvgSimulation:
    """The FedAvg server in one process. State: global model, round, history, aggregator, transforms.

    ``clients`` are :class:`~labsupport.fl.clients.DataClient` objects or anything with
    ``num_samples`` and ``fit``; ``test`` is ``(x, y)`` for the global model's evaluation.

    * ``aggregator`` -- an :class:`~labsupport.fl.aggregators.Aggregator` (default: the weighted mean);
    * ``transforms`` -- :class:`~labsupport.fl.transforms.UpdateTransform` objects, applied in order
      on the client and in reverse on the server; bytes up are those of the serialized payloads;
    * ``count_policy`` -- how claimed sample counts become weights (default: trust them);
    * ``selector`` -- who trains each round: a function of
      :func:`~labsupport.fl.selection.select_clients`'s signature (chapter 03's power-of-choice,
      :mod:`labsupport.fl.client_selection`); the default samples uniformly;
    * ``device`` -- where the clients train and the model is evaluated (default: ``$LAB_DEVICE`` if
      set, else the model's); the global state, payloads and checkpoints stay on the CPU;
    * ``checkpoint_dir`` -- the global model, history and the state of the aggregator and the
      transforms are saved after every round; a new simulation with the same arguments resumes
      from there (``resume=True``). Resuming with another config, aggregator, transform pipeline,
      count policy or number of clients is refused with the differences listed.
    """

    def __init__(
        self,
        model: nn.Module,
        clients: Sequence[Client],
        test: tuple[torch.Tensor, torch.Tensor] | None,
        config: FedAvgConfig | None = None,
        *,
        aggregator: Aggregator | None = None,
        transforms: Sequence[UpdateTransform] = (),
        count_policy: CountPolicy | None = None,
        selector: Callable[..., list[int]] | None = None,
        device: torch.device | str | None = None,
        checkpoint_dir: str | os.PathLike | None = None,
        resume: bool = True,
    ) -> None:
        if len(clients) == 0:
            raise ValueError("a federation needs at least one client; got an empty list")
        for i, c in enumerate(clients):
            if not isinstance(c, Client):
                raise TypeError(
                    f"client {i} is a {type(c).__name__}; expected an object with num_samples and fit()"
                )
        self.config = config or FedAvgConfig()
        if self.config.min_train_clients > len(clients):
            raise ValueError(
                f"min_train_clients={self.config.min_train_clients} but only {len(clients)} clients exist"
            )
        self.aggregator = aggregator if aggregator is not None else WeightedMean()
        if not isinstance(self.aggregator, Aggregator):
            raise TypeError(
                f"aggregator is a {type(self.aggregator).__name__}; expected an Aggregator "
                "(labsupport.fl.aggregators)"
            )
        self.pipeline = Pipeline(transforms)
        if self.pipeline.sums_payloads and type(self.aggregator) is not WeightedMean:
            raise ValueError(
                f"{type(self.pipeline.transforms[-1]).__name__} only lets the server decode the sum "
                f"of the updates, so {self.aggregator!r} cannot see them one by one: use WeightedMean"
            )
        self.count_policy = count_policy or CountPolicy()
        self.selector = selector if selector is not None else select_clients
        if device is None and os.environ.get("LAB_DEVICE"):
            device = get_device()  # LAB_DEVICE (cpu, cuda, mps) is honoured end to end
        self.device = torch.device(device) if device is not None else None
        self.model = model if self.device is None else model.to(self.device)
        self.scratch = copy.deepcopy(
            self.model
        )  # our clients train here, never in the global model
        self.clients = list(clients)
        self.test = test
        self.train_config = self.config.train_config()
        self.global_state: StateDict = {
            k: v.detach().to("cpu", copy=True) for k, v in self.model.state_dict().items()
        }
        self.round = 0
        self.history = History()
        self.checkpoint_path = Path(checkpoint_dir) / CHECKPOINT_NAME if checkpoint_dir else None
        self._state_nbytes = payload_nbytes(self.global_state)
        if self.checkpoint_path is not None and resume and self.checkpoint_path.exists():
            self.load_checkpoint(self.checkpoint_path)

    # ------------------------------------------------------------------------------- the round
    def _context(self, cid: int, selected: list[int], instructions: dict) -> RoundContext:
        """Client ``cid``'s context. Instructions are deep-copied for every client: what one client
        does to them reaches neither the next client nor the aggregator's own state."""
        server_round = self.round + 1
        return RoundContext(
            server_round=server_round,
            client_id=cid,
            seed=client_seed(self.config.seed, server_round, cid),
            cohort=tuple(selected),
            instructions=copy.deepcopy(instructions),
        )

    def _through_pipeline(self, reply: FitReply, ctx: RoundContext) -> tuple[FitReply | dict, int]:
        """Encode (client side), serialize, deserialize, decode (server side). Returns the rebuilt
        reply -- or, under secure aggregation, the payload only the sum can decode -- and its bytes."""
        g = self.global_state
        wire = serialize(self.pipeline.encode(state_delta(reply.state, g), ctx))
        received = deserialize(wire)
        if self.pipeline.sums_payloads:
            return received, len(wire)
        decoded = self.pipeline.decode(received, ctx, g)
        validate_update(g, decoded, 1, client=ctx.client_id)
        rebuilt = apply_delta(g, decoded)
        validate_update(g, rebuilt, 1, client=ctx.client_id)
        return FitReply(rebuilt, reply.num_samples, reply.metrics, reply.client), len(wire)

    def _collect(
        self, selected: list[int], instructions: dict
    ) -> tuple[list[FitReply], dict[int, dict], dict[int, str], int, dict]:
        """Run the selected clients; returns accepted replies (weights set by the count policy),
        masked payloads (secure aggregation only), rejections, bytes up and extra figures."""
        accepted: list[FitReply] = []
        payloads: dict[int, dict] = {}
        rejected: dict[int, str] = {}
        bytes_up = 0
        reweighted: dict[str, list[float]] = {}
        trained = self._train_vectorized(selected, instructions) if self.config.vectorized else {}
        for cid in selected:
            ctx = self._context(cid, selected, instructions)
            reply = trained.get(cid) or fit_or_reject(
                self.clients[cid], self.scratch, self.global_state, ctx, self.train_config
            )
            if isinstance(reply, Rejection):
                rejected[cid] = reply.reason
                continue
            try:
                weight = check_weight(self.count_policy.weight(cid, reply.num_samples), cid)
                if weight != reply.num_samples:
                    reweighted[str(cid)] = [reply.num_samples, weight]
                reply = FitReply(reply.state, weight, reply.metrics, cid)
                if self.pipeline:
                    out, nbytes = self._through_pipeline(reply, ctx)
                else:
                    out, nbytes = reply, self._state_nbytes  # same shapes: fixed serialized size
            except ValueError as exc:  # validation, a transform that cannot encode/decode, bytes
                reason = exc.reason if isinstance(exc, UpdateRejected) else str(exc)
                logger.warning("round %d: rejected client %d: %s", ctx.server_round, cid, reason)
                rejected[cid] = reason
                continue
            bytes_up += nbytes
            if isinstance(out, FitReply):
                accepted.append(out)
            else:
                payloads[cid] = out
                accepted.append(reply)  # for its weight and metrics; its state stays private
        extra = {"reweighted": reweighted} if reweighted else {}
        return accepted, payloads, rejected, bytes_up, extra

    def _train_vectorized(self, selected: list[int], instructions: dict) -> dict[int, FitReply]:
        """Train the selected plain DataClients together. An update that fails validation (e.g. it
        diverged to NaN) is left out, so that client is trained -- and rejected -- one by one."""
        from .vectorized import vectorized_local_updates

        plain = [
            cid
            for cid in selected
            if isinstance(self.clients[cid], DataClient) and self.clients[cid].plain
        ]
        if not plain:
            return {}
        cfg = self.train_config
        try:
            states, losses = vectorized_local_updates(
                self.scratch,
                self.global_state,
                [(self.clients[cid].x, self.clients[cid].y) for cid in plain],
                epochs=cfg.local_epochs,
                batch_size=cfg.batch_size,
                lr=cfg.lr,
                seeds=[client_seed(self.config.seed, self.round + 1, cid) for cid in plain],
            )
        except (ValueError, TypeError, RuntimeError) as exc:  # e.g. clients' data of other shapes
            logger.warning(
                "round %d: vectorized training failed (%r); training the clients one by one",
                self.round + 1,
                exc,
            )
            return {}
        out = {}
        for cid, state, loss in zip(plain, states, losses, strict=True):
            n = self.clients[cid].num_samples
            state = {k: v.to("cpu") for k, v in state.items()}
            try:
                validate_update(self.global_state, state, n, client=cid)
            except UpdateRejected:
                continue
            out[cid] = FitReply(state, n, {"loss": loss, "steps": num_local_steps(n, cfg)}, cid)
        return out

    def _aggregate(
        self, accepted: list[FitReply], payloads: dict[int, dict], server_round: int
    ) -> StateDict:
        g = self.global_state
        if self.pipeline.sums_payloads:
            weights = {r.client: r.num_samples for r in accepted}
            mean = self.pipeline.transforms[-1].aggregate_payloads(
                payloads, weights, server_round, g
            )
            ctx = RoundContext(
                server_round, SERVER_ID, client_seed(self.config.seed, server_round, SERVER_ID)
            )
            mean = self.pipeline.decode(mean, ctx, g, skip_last=True)
            new = apply_delta(g, mean)
        else:
            new = self.aggregator.aggregate(g, accepted)
        new = self.pipeline.finalize(g, new, server_round)
        validate_update(g, new, 1, client="aggregate")  # our own code: a bad result is a bug
        return clone_state(new)

    def _select(self, server_round: int) -> list[int]:
        """The round's cohort from ``self.selector`` (``select_clients``'s signature), checked."""
        cfg = self.config
        chosen = self.selector(
            len(self.clients),
            cfg.fraction_train,
            min_clients=cfg.min_train_clients,
            seed=cfg.seed,
            server_round=server_round,
        )
        ids = [int(c) for c in chosen]
        if not ids or len(set(ids)) != len(ids) or not all(0 <= c < len(self.clients) for c in ids):
            raise ValueError(
                f"selector {getattr(self.selector, '__name__', self.selector)!r} returned {chosen!r} "
                f"in round {server_round}; expected distinct client ids in [0, {len(self.clients)})"
            )
        return sorted(ids)

    def run_round(self, *, evaluate_now: bool | None = None) -> RoundRecord:
        """One round of Algorithm 1; returns (and records) what happened.

        The global model is evaluated every ``eval_every`` rounds and at the config's last round, or
        as ``evaluate_now`` says.
        """
        start = time.perf_counter()
        server_round = self.round + 1
        cfg = self.config
        selected = self._select(server_round)
        instructions = self.aggregator.instructions(server_round, clone_state(self.global_state))
        accepted, payloads, rejected, bytes_up, extra = self._collect(selected, instructions)
        if accepted:
            try:
                self.global_state = self._aggregate(accepted, payloads, server_round)
            except RoundAborted as exc:
                logger.warning("round %d aborted, the global model is kept: %s", server_round, exc)
                extra["aborted"] = str(exc)
        else:
            logger.warning("round %d: no valid update; the global model is kept", server_round)
        losses = [(r.metrics["loss"], r.num_samples) for r in accepted if "loss" in r.metrics]
        train_loss = None
        if losses:  # weights scaled by their maximum first: counts near 1e308 cannot overflow
            top = max(w for _, w in losses)
            train_loss = sum(loss * (w / top) for loss, w in losses) / sum(
                w / top for _, w in losses
            )
        self.round = server_round
        eval_start = time.perf_counter()
        acc = loss = None
        if evaluate_now is None:
            evaluate_now = server_round % cfg.eval_every == 0 or server_round == cfg.num_rounds
        if self.test is not None and evaluate_now:
            metrics = self.evaluate()
            acc, loss = metrics["accuracy"], metrics["loss"]
        end = time.perf_counter()
        record = RoundRecord(
            round=server_round,
            clients=selected,
            rejected=rejected,
            train_loss=train_loss,
            accuracy=acc,
            loss=loss,
            bytes_up=bytes_up,
            bytes_down=self._state_nbytes * len(selected),
            seconds=end - start,
            eval_seconds=end - eval_start,
            extra=extra,
        )
        self.history.append(record)
        if self.checkpoint_path is not None:
            self.save_checkpoint(self.checkpoint_path)
        return record

    def run(
        self, num_rounds: int | None = None, *, progress: bool = True, desc: str = "FedAvg"
    ) -> History:
        """Run until round ``num_rounds`` (default: the config's), resuming where the state is.

        The last round run is always evaluated.
        """
        target = self.config.num_rounds if num_rounds is None else num_rounds
        bar = tqdm(total=target, initial=min(self.round, target), desc=desc, disable=not progress)
        while self.round < target:
            record = self.run_round(evaluate_now=True if self.round + 1 == target else None)
            bar.update(1)
            if record.accuracy is not None:
                bar.set_postfix(acc=f"{record.accuracy:.3f}")
        bar.close()
        return self.history

    def evaluate(self) -> dict[str, float]:
        """Loss and accuracy of the global model on the test set."""
        if self.test is None:
            raise ValueError("this simulation has no test set")
        return evaluate(self.global_model(), *self.test)

    def global_model(self) -> nn.Module:
        """The model holding the current global weights."""
        self.model.load_state_dict(self.global_state)
        return self.model

    # ----------------------------------------------------------------------- checkpoint/resume
    def _fingerprint(self) -> dict:
        return {
            "config": dataclasses.asdict(self.config),
            "num_clients": len(self.clients),
            "aggregator": self.aggregator.config(),
            "transforms": self.pipeline.config(),
            "count_policy": self.count_policy.config(),
        }

    def save_checkpoint(self, path: str | os.PathLike) -> None:
        """Write round, global model, history, aggregator and transform state atomically to ``path``."""
        save_checkpoint(
            path,
            {
                "round": self.round,
                "global_state": self.global_state,
                "history": self.history.to_dicts(),
                "fingerprint": self._fingerprint(),
                "aggregator": self.aggregator.state_dict(),
                "transforms": self.pipeline.state_dict(),
            },
        )

    def load_checkpoint(self, path: str | os.PathLike) -> None:
        """Resume from a checkpoint written by a simulation with the same arguments.

        A checkpoint that cannot be read raises :class:`~labsupport.fl.checkpoint.CheckpointError`
        (delete it, or pass ``resume=False`` to start fresh and overwrite it).
        """
        try:
            payload = load_checkpoint(path)
            saved, mine = payload["fingerprint"], self._fingerprint()
        except (CheckpointError, KeyError, TypeError) as exc:
            raise CheckpointError(
                f"cannot resume from {path}: {exc}. Delete it or pass resume=False to start fresh"
            ) from None
        if saved != mine:
            diff = {
                f"config.{k}": (saved["config"].get(k), v)
                for k, v in mine["config"].items()
                if saved["config"].get(k) != v
            }
            for key in ("num_clients", "aggregator", "transforms", "count_policy"):
                if saved.get(key) != mine[key]:
                    diff[key] = (saved.get(key), mine[key])
            raise ValueError(
                f"checkpoint {path} was written by a different run (saved, now): {diff}; "
                "use another checkpoint_dir or pass resume=False"
            )
        try:
            validate_update(self.global_state, payload["global_state"], 1, client="checkpoint")
            history = History.from_dicts(payload["history"])
            self.aggregator.load_state_dict(payload["aggregator"])
            self.pipeline.load_state_dict(payload["transforms"])
        except (ValueError, KeyError, TypeError) as exc:
            raise CheckpointError(
                f"checkpoint {path} is inconsistent: {exc}. Delete it or pass resume=False"
            ) from None
        self.global_state = clone_state(payload["global_state"])
        self.round = int(payload["round"])
        self.history = history
        self.model.load_state_dict(self.global_state)
