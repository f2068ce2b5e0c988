"""The training loop the worker runs: data, model, optimiser, epochs with validation, early
stopping, a checkpoint after every epoch, and the TorchScript export with its signature.

With several workers (torchrun, DDP) every rank trains on its share of each global batch and
rank 0 alone evaluates, checkpoints, exports and reports. Shuffling is seeded per epoch, so a
run resumed from a checkpoint gives the same metrics as one that never stopped.
"""

from __future__ import annotations

import copy
import logging
import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from services.common import summaries
from services.trainer import data as datasets
from services.trainer.models import Exported, Standardize, build
from services.trainer.spec import TrainingSpec

log = logging.getLogger(__name__)

Emit = Callable[[dict[str, Any]], None]
PROGRESS_EVERY_SECONDS = 0.5
EVAL_BATCH = 1024
CHECKPOINT = "checkpoint.pt"
ARTIFACT = "model.pt"


@dataclass
class Job:
    """Where a job's files are and how it was asked to run."""

    folder: Path
    spec: TrainingSpec
    dataset_file: Path | None  # registry datasets: the downloaded file
    dataset_format: str  # NPZ or CSV for registry datasets
    target_column: str
    rank: int = 0
    world: int = 1

    @property
    def leader(self) -> bool:
        return self.rank == 0


@dataclass
class Splits:
    train: tuple[torch.Tensor, torch.Tensor]
    val: tuple[torch.Tensor, torch.Tensor]
    test: tuple[torch.Tensor, torch.Tensor]
    task: str
    outputs: int
    sample_shape: tuple[int, ...]
    vocabulary: str
    class_names: list[str]


def train(job: Job, emit: Emit, device: torch.device) -> dict[str, Any] | None:
    """Run the job to the end. Rank 0 returns the result (artifact, signature, metrics)."""
    spec = job.spec
    torch.manual_seed(spec.seed)
    splits = load_splits(job)
    model = make_model(spec, splits).to(device)
    net: nn.Module = model
    if job.world > 1:
        net = nn.parallel.DistributedDataParallel(model)
    optimizer = make_optimizer(spec, model)
    scheduler = make_scheduler(spec, optimizer)
    state = {"epoch": 0, "best_loss": math.inf, "best_epoch": 0, "bad_epochs": 0, "step": 0}
    best_weights = copy.deepcopy(model.state_dict())
    checkpoint = job.folder / CHECKPOINT
    if checkpoint.exists():
        saved = torch.load(checkpoint, map_location=device, weights_only=True)
        model.load_state_dict(saved["model"])
        optimizer.load_state_dict(saved["optimizer"])
        scheduler.load_state_dict(saved["scheduler"])
        best_weights = saved["best_weights"]
        state.update(saved["state"])
        log.info("resumed from the checkpoint of epoch %d", state["epoch"])
    if job.leader:
        emit({"type": "started", "device": str(device), "workers": job.world, "resumed_from_epoch": state["epoch"]})

    x_train, y_train = splits.train
    batch = spec.batch_size
    steps_per_epoch = max(1, len(x_train) // batch)  # drop the ragged last batch: every rank takes a share
    total_steps = steps_per_epoch * spec.epochs
    started, last_report, samples_seen = time.monotonic(), 0.0, 0
    for epoch in range(state["epoch"], spec.epochs):
        net.train()
        order = torch.randperm(len(x_train), generator=torch.Generator().manual_seed(spec.seed * 100_003 + epoch))
        running_loss = 0.0
        for step in range(steps_per_epoch):
            indices = order[step * batch : (step + 1) * batch][job.rank :: job.world]
            inputs, targets = x_train[indices].to(device), y_train[indices].to(device)
            optimizer.zero_grad(set_to_none=True)
            loss = training_loss(model, splits.task, net(inputs), targets)
            loss.backward()
            optimizer.step()
            running_loss = loss.item() if step == 0 else 0.9 * running_loss + 0.1 * loss.item()
            state["step"] += 1
            samples_seen += batch
            now = time.monotonic()
            if job.leader and now - last_report >= PROGRESS_EVERY_SECONDS:
                last_report = now
                emit(progress(spec, epoch, state["step"], total_steps, running_loss, samples_seen, now - started, {}))
        scheduler.step()
        stop = torch.zeros(1)
        if job.leader:
            metrics = evaluate(model, splits.val, splits.task, device, "val")
            emit(progress(spec, epoch + 1, state["step"], total_steps, running_loss, samples_seen,
                          time.monotonic() - started, metrics))
            if metrics["val_loss"] < state["best_loss"] - 1e-6:
                state.update(best_loss=metrics["val_loss"], best_epoch=epoch + 1, bad_epochs=0)
                best_weights = copy.deepcopy(model.state_dict())
            else:
                state["bad_epochs"] += 1
            state["epoch"] = epoch + 1
            save_checkpoint(checkpoint, model, optimizer, scheduler, best_weights, state)
            emit({"type": "checkpoint", "epoch": epoch + 1, "metrics": metrics})
            patience = spec.early_stopping_patience
            if patience and state["bad_epochs"] >= patience and epoch + 1 < spec.epochs:
                log.info("early stopping after epoch %d: val_loss has not improved since epoch %d",
                         epoch + 1, state["best_epoch"])
                stop[0] = 1
        if job.world > 1:
            dist.broadcast(stop, src=0)
        if stop.item():
            break
    if not job.leader:
        return None
    if spec.early_stopping_patience:
        model.load_state_dict(best_weights)
    return export(job, model.cpu(), splits)


def load_splits(job: Job) -> Splits:
    spec = job.spec
    if spec.builtin:
        arrays = datasets.load_builtin(spec.dataset, spec.task)
    else:
        assert job.dataset_file is not None
        arrays = datasets.load_file(job.dataset_file, job.dataset_format, job.target_column, spec.task)
    if arrays.task == "language":
        x, y = datasets.text_windows(arrays.x, spec.hyperparameters["block_size"], spec.max_samples)
        arrays = datasets.Arrays(x, y, "language", arrays.classes, arrays.vocabulary)
    train_idx, val_idx, test_idx = datasets.split(
        arrays, spec.validation_fraction, spec.test_fraction, spec.seed, spec.max_samples
    )
    x, y = torch.from_numpy(arrays.x), torch.from_numpy(arrays.y)
    if arrays.task == "regression" and y.dim() == 1:
        y = y.unsqueeze(1)
    outputs = arrays.classes if arrays.task in ("classification", "language") else y.shape[1]
    log.info("dataset %s: %d train, %d validation, %d test samples", spec.dataset, len(train_idx),
             len(val_idx), len(test_idx))
    pick = lambda idx: (x[torch.from_numpy(idx)], y[torch.from_numpy(idx)])  # noqa: E731
    return Splits(pick(train_idx), pick(val_idx), pick(test_idx), arrays.task, outputs,
                  tuple(arrays.x.shape[1:]), arrays.vocabulary, arrays.class_names)


def make_model(spec: TrainingSpec, splits: Splits) -> Exported:
    net = build(spec.architecture, spec.hyperparameters, splits.sample_shape, splits.outputs)
    x, y = splits.train
    if splits.task == "language":
        standardize: nn.Module = nn.Identity()
    else:
        standardize = Standardize(x.mean(0), x.std(0) if len(x) > 1 else torch.ones(x.shape[1:]))
    if splits.task == "regression":
        mean, std = y.mean(0), y.std(0) if len(y) > 1 else torch.ones(y.shape[1:])
        std = torch.where(std > 1e-6, std, torch.ones_like(std))
    else:
        mean, std = torch.zeros(()), torch.ones(())
    return Exported(net, standardize, mean, std)


def loss_of(task: str, outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    if task == "regression":
        return F.mse_loss(outputs, targets)
    if task == "language":
        return F.cross_entropy(outputs.reshape(-1, outputs.shape[-1]), targets.reshape(-1))
    return F.cross_entropy(outputs, targets)


def training_loss(model: Exported, task: str, outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Regression is optimised on standardised targets so every learning rate sees unit scale."""
    if task == "regression":
        return F.mse_loss((outputs - model.target_mean) / model.target_std, (targets - model.target_mean) / model.target_std)
    return loss_of(task, outputs, targets)


@torch.no_grad()
def evaluate(model: nn.Module, split: tuple[torch.Tensor, torch.Tensor], task: str, device: torch.device,
             prefix: str) -> dict[str, float]:
    model.eval()
    x, y = split
    outputs = torch.cat([model(x[i : i + EVAL_BATCH].to(device)).cpu() for i in range(0, len(x), EVAL_BATCH)])
    metrics = {"loss": loss_of(task, outputs, y).item()}
    if task == "classification":
        metrics["accuracy"] = (outputs.argmax(1) == y).float().mean().item()
    elif task == "regression":
        residual = ((outputs - y) ** 2).sum().item()
        total = ((y - y.mean(0)) ** 2).sum().item()
        metrics["mse"] = metrics["loss"]
        metrics["r2"] = 1.0 - residual / total if total > 0 else 0.0
    else:
        metrics["perplexity"] = math.exp(min(metrics["loss"], 50.0))
    return {f"{prefix}_{name}": value for name, value in metrics.items()}


def progress(spec: TrainingSpec, epoch: int, step: int, total_steps: int, loss: float, samples: int,
             elapsed: float, metrics: dict[str, float]) -> dict[str, Any]:
    rate = samples / elapsed if elapsed > 0 else 0.0
    steps_per_second = rate / spec.batch_size if rate else 0.0
    return {
        "type": "progress", "epoch": epoch, "epochs": spec.epochs, "step": step, "total_steps": total_steps,
        "loss": loss, "metrics": metrics, "samples_per_second": rate,
        "eta_seconds": (total_steps - step) / steps_per_second if steps_per_second else 0.0,
    }


def make_optimizer(spec: TrainingSpec, model: nn.Module) -> torch.optim.Optimizer:
    params, lr, decay = model.parameters(), spec.learning_rate, spec.weight_decay
    if spec.optimizer == "sgd":
        return torch.optim.SGD(params, lr=lr, weight_decay=decay)
    if spec.optimizer == "momentum":
        return torch.optim.SGD(params, lr=lr, momentum=spec.momentum, weight_decay=decay)
    if spec.optimizer == "adamw":
        return torch.optim.AdamW(params, lr=lr, weight_decay=decay)
    return torch.optim.Adam(params, lr=lr, weight_decay=decay)


def make_scheduler(spec: TrainingSpec, optimizer: torch.optim.Optimizer) -> torch.optim.lr_scheduler.LRScheduler:
    if spec.schedule == "step":
        return torch.optim.lr_scheduler.StepLR(optimizer, step_size=spec.step_epochs, gamma=spec.step_gamma)
    if spec.schedule == "cosine":
        return torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=spec.epochs)
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda _: 1.0)


def save_checkpoint(path: Path, model: nn.Module, optimizer: torch.optim.Optimizer,
                    scheduler: torch.optim.lr_scheduler.LRScheduler, best_weights: dict[str, Any],
                    state: dict[str, Any]) -> None:
    """Written aside and renamed, so a kill mid-write leaves the previous checkpoint intact."""
    temp = path.with_suffix(".tmp")
    torch.save({"model": model.state_dict(), "optimizer": optimizer.state_dict(),
                "scheduler": scheduler.state_dict(), "best_weights": best_weights, "state": state}, temp)
    temp.replace(path)


def export(job: Job, model: Exported, splits: Splits) -> dict[str, Any]:
    """Script and save the model, reload the saved file and measure it on every split: the
    metrics registered are those of the artifact itself."""
    model.eval()
    path = job.folder / ARTIFACT
    torch.jit.save(torch.jit.script(model), str(path))
    artifact = torch.jit.load(str(path))
    metrics: dict[str, float] = {}
    for name, split in (("train", splits.train), ("val", splits.val), ("test", splits.test)):
        metrics.update(evaluate(artifact, split, splits.task, torch.device("cpu"), name))
    if splits.task == "language":
        metrics["unigram_loss"] = unigram_loss(splits)
    metadata = {"task": splits.task, "architecture": job.spec.architecture, **baseline_metadata(splits)}
    if splits.vocabulary:
        metadata["vocabulary"] = splits.vocabulary
    if splits.class_names:
        metadata["class_names"] = ",".join(splits.class_names)
    log.info("exported %s: %s", ARTIFACT, ", ".join(f"{k}={v:.4f}" for k, v in sorted(metrics.items())))
    return {"type": "result", "artifact": ARTIFACT, "signature": signature(splits), "metrics": metrics,
            "metadata": metadata}


def baseline_metadata(splits: Splits) -> dict[str, str]:
    """The training split summarized as the drift monitor reads it (services.common.summaries):
    per-feature histograms of the input `x` and the distribution of the targets. None for text."""
    if splits.task == "language":
        return {}
    x, y = splits.train
    classes = splits.outputs if splits.task == "classification" else 0
    return {summaries.BASELINE_KEY: summaries.baseline({"x": x.numpy()}, y.numpy(), classes).to_json()}


def unigram_loss(splits: Splits) -> float:
    """Cross entropy on the validation text of always predicting the training character frequencies."""
    counts = torch.bincount(splits.train[1].reshape(-1), minlength=splits.outputs).double() + 1.0
    log_probs = torch.log(counts / counts.sum())
    return float(-log_probs[splits.val[1].reshape(-1)].mean())


def signature(splits: Splits) -> dict[str, list[dict[str, Any]]]:
    """Per-sample shapes; the batch dimension is implied."""
    if splits.task == "language":
        return {"inputs": [{"name": "tokens", "datatype": "INT64", "shape": [-1]}],
                "outputs": [{"name": "logits", "datatype": "FP32", "shape": [-1, splits.outputs]}]}
    name = "y" if splits.task == "regression" else "logits"
    return {"inputs": [{"name": "x", "datatype": "FP32", "shape": list(splits.sample_shape)}],
            "outputs": [{"name": name, "datatype": "FP32", "shape": [splits.outputs]}]}

