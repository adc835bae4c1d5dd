"""Training loop: BPR on resampled triples, Adam, validation early stopping, test at the best epoch.

Single process by default; data-parallel over the processes of a ``torchrun`` launch
(:mod:`training.distributed`); full-graph or neighbour-sampled mini-batch propagation for MetaMMF_GCN
(``train.neighbor_sampling``).
"""

from __future__ import annotations

import copy
import logging
import os
import random
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from functools import partial

import numpy as np
import torch
from tqdm.auto import tqdm

from models.base import ModelInputs, RecModel
from models.config import ModelConfig
from models.hardware import usable_cpus
from models.registry import build_model as build_registered
from training.config import TrainConfig, check_neighbor_sampling
from training.data import RecData
from training.distributed import DistContext, all_reduce_sum, broadcast_flag, data_parallel, local_share, process_group
from training.evaluate import EvalResult, add_untrained_slice, full_rank_evaluate
from training.precision import effective_precision, run_precision, step_precision
from training.sampling import BPRSampler

log = logging.getLogger(__name__)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def model_inputs(data: RecData) -> ModelInputs:
    """What models are built from: item features and the training interactions (never valid/test)."""
    return ModelInputs(
        n_users=data.n_users,
        item_features=torch.from_numpy(data.item_features()),
        modality_dims=data.modality_dims,
        train_pairs=torch.from_numpy(data.train),
    )


def build_model(data: RecData, config: ModelConfig, reg_weight: float) -> RecModel:
    """Instantiate the model named by ``config.name`` for ``data`` (see :mod:`models.registry`)."""
    return build_registered(model_inputs(data), config, reg_weight)


def make_optimizer(model: torch.nn.Module, lr: float) -> torch.optim.Adam:
    """Adam over the model's parameters, with PyTorch's fused kernel where it has one (CPU and CUDA): one
    pass per parameter instead of one per Adam operation, about 1.5 ms of a 35 ms MetaMMF_GCN step on TikTok."""
    params = list(model.parameters())
    fused = all(p.device.type in ("cpu", "cuda") and p.dtype.is_floating_point for p in params)
    return torch.optim.Adam(params, lr=lr, fused=fused or None)


@dataclass
class TrainResult:
    """The best model (weights restored) and what happened on the way."""

    model: RecModel
    best_epoch: int
    best_valid: dict[str, float]
    valid: EvalResult
    test: EvalResult
    history: list[dict[str, float]] = field(default_factory=list)
    train_seconds: float = 0.0
    new_item_scale: float | None = None  # calibrate_new_items' multiplier (None: the model has no such scale)
    precision: str = "fp32"  # the precision the run used (bf16 falls back to fp32 on a CPU without it)


def evaluate_split(model: RecModel, data: RecData, split: str, cfg: TrainConfig) -> EvalResult:
    """Full ranking on ``split`` ('valid' or 'test'): training items (and validation items when
    scoring test) are masked. Test also reports ``untrained_<metric>``: the same ranking scored on the
    interactions with items that have no training interaction (only content can rank them)."""
    targets = data.valid if split == "valid" else data.test
    exclude = [data.train] if split == "valid" else [data.train, data.valid]
    model.eval()
    model.prepare_inference()
    try:
        evaluate = partial(
            full_rank_evaluate,
            model.full_sort_predict,
            exclude=exclude,
            n_users=data.n_users,
            n_items=data.n_items,
            ks=cfg.ks,
            batch_size=cfg.eval_batch_size,
            device=cfg.device,
        )
        result = evaluate(targets=targets, show_progress=cfg.progress)
        if split == "test":
            add_untrained_slice(result, evaluate, targets, data.train, data.n_items)
        return result
    finally:
        model.clear_inference_cache()


def _evaluate_data(model: RecModel, split: str, *, data: RecData, cfg: TrainConfig) -> EvalResult:
    return evaluate_split(model, data, split, cfg)


SplitEvaluator = Callable[[RecModel, str], EvalResult]


def train(
    data: RecData, model_config: ModelConfig, cfg: TrainConfig, evaluate: SplitEvaluator | None = None
) -> TrainResult | None:
    """Train until the validation ``cfg.monitor`` stops improving for ``cfg.patience`` evaluations,
    then restore the best weights and score the test split with them.

    ``evaluate(model, split)`` scores 'valid' or 'test' (default: :func:`evaluate_split` on ``data``);
    the cold-start protocol (:mod:`training.coldstart`) passes one that ranks held-out items. Early stopping
    follows the validation metrics' ``selection`` entry where the evaluator gives one, else ``cfg.monitor``.

    Launched by ``torchrun`` with several processes, trains data-parallel (see :mod:`training.distributed`)
    and returns the result on rank 0 only (``None`` on the other ranks).
    """
    check_neighbor_sampling(model_config, cfg)
    with process_group(cfg.device) as (ctx, device):
        if ctx.enabled:
            cfg = cfg.model_copy(update={"device": str(device), "progress": cfg.progress and ctx.is_main})
        cfg = cfg.model_copy(update={"precision": effective_precision(cfg.precision, device)})
        with cpu_threads(cfg.threads, device), run_precision(cfg.precision, device):
            return _train(data, model_config, cfg, ctx, device, evaluate)


@contextmanager
def cpu_threads(threads: int | None, device: torch.device) -> Iterator[None]:
    """torch's intra-op threads for a run on the CPU: ``threads``, else $OMP_NUM_THREADS when set (torch took
    it already), else the CPUs this process may use (torch's own default is every core of the host, also in a
    container limited to fewer). Restored afterwards."""
    if device.type != "cpu" or (threads is None and os.environ.get("OMP_NUM_THREADS")):
        yield
        return
    before = torch.get_num_threads()
    torch.set_num_threads(threads or usable_cpus())
    log.info("training on %d CPU thread(s); OpenMP wait: %s", torch.get_num_threads(),
             os.environ.get("MMF_OPENMP_WAIT") or os.environ.get("OMP_WAIT_POLICY") or "default")  # fmt: skip
    try:
        yield
    finally:
        torch.set_num_threads(before)


def _train(
    data: RecData,
    model_config: ModelConfig,
    cfg: TrainConfig,
    ctx: DistContext,
    device: torch.device,
    evaluate: SplitEvaluator | None = None,
) -> TrainResult | None:
    if evaluate is None:
        evaluate = partial(_evaluate_data, data=data, cfg=cfg)
    seed_everything(cfg.seed)
    model = build_model(data, model_config, cfg.reg_weight).to(device)
    optimizer = make_optimizer(model, cfg.lr)
    # Seeded alike on every rank: all ranks draw the same global batches (each computes its share).
    sampler = BPRSampler(data.train, data.n_items, cfg.batch_size, seed=cfg.seed)
    if cfg.monitor not in {f"{m}@{k}" for m in ("recall", "ndcg", "precision", "hit") for k in cfg.ks}:
        raise ValueError(f"train.monitor={cfg.monitor!r} is not one of the computed metrics (ks={cfg.ks})")
    loss_fn = model.calculate_loss
    hardest = partial(hardest_negatives, model) if cfg.negative_candidates > 1 else None
    if cfg.neighbor_sampling:
        # Its own generator (per rank: ranks sample their shares independently), so the global RNG
        # stream (init, edge dropout) is the same as without sampling.
        generator = torch.Generator(device).manual_seed(cfg.seed + ctx.rank)
        fanouts = cfg.fanouts_for(model_config.gcn_layers)
        loss_fn = partial(model.calculate_sampled_loss, fanouts=fanouts, generator=generator)
    ddp = data_parallel(model, loss_fn, device) if ctx.enabled else None

    best_score, best_epoch, best_state, best_valid = -np.inf, 0, None, {}
    history: list[dict[str, float]] = []
    stale, train_seconds = 0, 0.0
    bar = tqdm(range(1, cfg.epochs + 1), desc="epochs", disable=not cfg.progress, leave=False)
    for epoch in bar:
        model.train()
        model.on_epoch_start()
        start, total_loss = time.perf_counter(), 0.0
        for users, pos, neg in sampler.epoch(cfg.negative_candidates, hardest):
            with step_precision(cfg.precision, device):
                if ddp is None:
                    loss = loss_fn(*(torch.from_numpy(a).to(device) for a in (users, pos, neg)))
                else:
                    share, scale = local_share(len(users), ctx)
                    # An empty share (a batch smaller than the world) still runs forward and backward, for
                    # the collective all-reduce, on the whole batch with weight 0.
                    batch = [torch.from_numpy(a[share] if scale else a).to(device) for a in (users, pos, neg)]
                    loss = ddp(*batch) * scale
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            total_loss += loss.item()
        if ddp is not None:  # sum over ranks of scale_r * loss_r / world = the loss of the global batches
            total_loss = all_reduce_sum(total_loss, device) / ctx.world_size
        epoch_seconds = time.perf_counter() - start
        train_seconds += epoch_seconds
        record = {"epoch": epoch, "loss": total_loss / len(sampler), "seconds": epoch_seconds}
        if ctx.is_main and (epoch % cfg.eval_every == 0 or epoch == cfg.epochs):
            valid = evaluate(model, "valid")
            record.update({f"valid_{k}": v for k, v in valid.metrics.items()})
            # An evaluator may define its own selection rule (the cold-item protocol: training.coldstart).
            score = valid.metrics.get("selection", valid.metrics[cfg.monitor])
            if score > best_score:
                best_score, best_epoch, best_valid, stale = score, epoch, valid.metrics, 0
                best_state = copy.deepcopy(model.state_dict())
            else:
                stale += 1
            bar.set_postfix(loss=f"{record['loss']:.4f}", **{cfg.monitor: f"{score:.4f}"})
        history.append(record)
        stop = None
        if stale >= cfg.patience:
            stop = f"early stop: {cfg.monitor} did not improve for {cfg.patience} evaluations"
        elif cfg.max_seconds is not None and train_seconds >= cfg.max_seconds:
            stop = f"stopping: max_seconds={cfg.max_seconds} reached"
        if ctx.is_main:
            log.info(
                "epoch %d loss %.4f %s %.4f (best %.4f @ %d) %.2fs",
                epoch, record["loss"], cfg.monitor, record.get(f"valid_{cfg.monitor}", float("nan")),
                best_score, best_epoch, epoch_seconds,
            )  # fmt: skip
            if stop:
                log.info("%s", stop)
        if ddp is not None:  # rank 0 decides (it alone evaluates, and wall times differ between ranks)
            stop = broadcast_flag(stop is not None, device)
        if stop:
            break

    if not ctx.is_main:
        return None
    if best_state is not None:
        model.load_state_dict(best_state)
    new_item_scale = calibrate_new_items(model, evaluate, cfg)
    valid = evaluate(model, "valid")
    test = evaluate(model, "test")
    return TrainResult(
        model, best_epoch, best_valid, valid, test, history, train_seconds, new_item_scale, precision=cfg.precision
    )


@torch.no_grad()
def hardest_negatives(model: RecModel, users: np.ndarray, candidates: np.ndarray, chunk: int = 65536) -> np.ndarray:
    """For each row, the column of ``candidates`` (n, c) that ``model`` scores highest for ``users[row]``
    (its final embeddings as they stand, in inference mode: no dropout of any kind)."""
    was_training = model.training
    model.eval()
    try:
        user_emb, item_emb = model.get_embedding()
    finally:
        model.train(was_training)
    device = user_emb.device
    chosen = np.empty(len(users), dtype=np.int64)
    for start in range(0, len(users), chunk):
        rows = slice(start, start + chunk)
        u = user_emb[torch.from_numpy(users[rows]).to(device)]
        items = item_emb[torch.from_numpy(candidates[rows]).to(device)]
        chosen[rows] = torch.einsum("nd,ncd->nc", u.float(), items.float()).argmax(1).cpu().numpy()
    return chosen


# Multipliers of the learned scale, 1/4 to 32 in steps of sqrt(2): the learned scale itself is shrunk by the
# L2 term on the batch representations, so the right multiplier can be well above 1.
NEW_ITEM_SCALES = tuple(2 ** (step / 2) for step in range(-4, 11))


def within_one_standard_error(candidate: np.ndarray, best: np.ndarray) -> bool:
    """Whether per-user values ``candidate`` are not worse than ``best`` (the same users) by more than one
    standard error of their paired difference."""
    if len(best) < 2:
        return bool(candidate.mean() >= best.mean()) if len(best) else True
    difference = candidate - best
    return bool(difference.mean() >= -difference.std(ddof=1) / np.sqrt(len(difference)))


@torch.no_grad()
def calibrate_new_items(model: RecModel, evaluate: SplitEvaluator, cfg: TrainConfig) -> float | None:
    """Fit how strongly new items compete with trained ones: the multiplier of the learned scale of their
    content neighbours' states (``model.content_neighbors``) among ``NEW_ITEM_SCALES``, by the validation
    ``cfg.monitor`` over every validation interaction in one ranking of all items (the ``all`` ranking where
    the evaluator reports it, the cold-item protocol; else the plain one: there items without training
    interactions compete).

    ``cfg.new_item_scale_rule`` 'best' takes the best multiplier (ties: the one nearest 1). 'one_se' (the
    default) takes the one-standard-error rule: the largest multiplier that is, like every multiplier between
    it and the best one, within one standard error (of the per-user paired difference) of the best. Over the
    plateau where trading a few trained items' slots for new items' leaves the validation metric unchanged
    within its noise, new items get the most exposure, and the choice does not follow the noise (taking the
    best alone picked 1 to 2 on TikTok's plateau, seed by seed: docs/results.md, "New items under the served
    default"). What changes is mostly how many new items reach a user's top k: the scale is positive, so their
    order among themselves changes only through terms it does not scale (the item graph's row). Returns the
    multiplier, or None for a model without that scale."""
    neighbors = getattr(model, "neighbors", None)
    if neighbors is None:
        return None
    learned = neighbors.scale.detach().clone()

    def per_user(multiplier: float) -> np.ndarray:
        neighbors.scale.copy_(learned * multiplier)
        result = evaluate(model, "valid")
        return result.rankings.get("all", result).per_user[cfg.monitor]

    values = {m: per_user(m) for m in NEW_ITEM_SCALES}
    means = {m: float(v.mean()) if len(v) else 0.0 for m, v in values.items()}
    best = max(NEW_ITEM_SCALES, key=lambda m: (means[m], -abs(m - 1.0)))
    chosen = best
    # A curve that does not move at all says nothing about new items (none take part in validation): the
    # learned scale stays, rather than the largest multiplier.
    if cfg.new_item_scale_rule == "one_se" and any(not np.array_equal(v, values[best]) for v in values.values()):
        for m in (m for m in NEW_ITEM_SCALES if m > best):
            if not within_one_standard_error(values[m], values[best]):
                break
            chosen = m
    neighbors.scale.copy_(learned * chosen)
    log.info("new items' scale: learned %.3f x %.2f (best %.2f; validation %s %s)", learned.item(), chosen, best,
             cfg.monitor, ", ".join(f"{m:.3g}: {s:.4f}" for m, s in means.items()))  # fmt: skip
    return chosen
