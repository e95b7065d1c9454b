"""The training loop of one job, with checkpoints it can resume from.

Batches are drawn in a fixed order from the job's seed (a fresh permutation of the examples per
epoch), so a job resumed at step ``s`` sees exactly the batches it would have seen. A checkpoint
is the adapters, the optimiser state (safetensors) and a small JSON state, written to a temporary
folder and renamed into place.

On the CPU a batch is run as micro-batches of similar length (:func:`micro_batches`): padding a
256-token chat window and seven 40-token fact questions to one width made a chat job's steps
about three times the work of its tokens. The loss of each micro-batch is weighted by its share of
the batch's loss tokens, so the gradient is the one the whole batch would give.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from engram_app.engram import EngramOptimizer
from engram_app.atomic import new_folder
from engram_app.training.adapters import Adapted
from engram_app.training.evaluate import pad_batch, pad_id
from engram_app.training.queue import TrainOptions
from engram_app.training.text import IGNORE, Example

ADAPTER_DIR = "adapter"
STATE_FILE = "state.json"
OPTIMIZER_FILE = "optimizer.safetensors"

# What one more forward and backward call costs on the CPU, in tokens of work (bench/train_batching.py:
# SmolLM2-135M, 2 threads). On a GPU padding costs next to nothing and calls are what cost: one call.
CPU_CALL_OVERHEAD = 48


@dataclass
class StepReport:
    step: int
    total: int
    loss: float
    lr: float
    tokens_per_second: float
    elapsed: float
    eta: float | None
    rows_touched: int

    def metrics(self) -> dict[str, float | None]:
        return {"loss": self.loss, "lr": self.lr, "tokens_per_second": self.tokens_per_second,
                "elapsed": self.elapsed, "eta": self.eta, "rows_touched": self.rows_touched}


def total_steps(options: TrainOptions, examples: int, until_recalled: bool = False) -> int:
    """The step cap: ``max_steps`` when given, else ``epochs`` passes over the examples, or, when a
    recall check ends the run (``until_recalled``), ``recall_epochs`` passes if that is more."""
    if options.max_steps is not None:
        return options.max_steps
    epochs = options.epochs
    if until_recalled and options.recall_epochs is not None:
        epochs = max(epochs, options.recall_epochs)
    return max(1, math.ceil(epochs * examples / options.batch_size))


def trained_on_until(learned_at: int, options: TrainOptions) -> int:
    """The step a run that learned its facts at step ``learned_at`` ends at: ``options.consolidate``
    times as many steps, rounded up to a recall check (the step cap and time budget still bind)."""
    every = options.recall_every
    return max(learned_at, math.ceil(options.consolidate * learned_at / every - 1e-9) * every)


def lr_factor(step: int, total: int, final: float) -> float:
    """The learning rate of step ``step`` (0-based) as a fraction of the one set: 1 at the first step,
    falling linearly to ``final`` at the last of ``total``. A function of the step, so a resumed job
    takes the very step sizes it was taking."""
    return 1 - (1 - final) * min(step / max(total - 1, 1), 1.0)


def batch_indices(count: int, batch_size: int, step: int, seed: int) -> list[int]:
    """The examples of step ``step`` (0-based): a deterministic function of (count, seed, step)."""
    per_epoch = max(1, math.ceil(count / batch_size))
    epoch, index = divmod(step, per_epoch)
    generator = torch.Generator().manual_seed(seed * 100_003 + epoch)
    order = torch.randperm(count, generator=generator).tolist()
    return order[index * batch_size: (index + 1) * batch_size]


def micro_batches(lengths: list[int], overhead: float | None) -> list[list[int]]:
    """The positions of a batch's examples cut into micro-batches: the split of the batch sorted by
    length whose cost, ``overhead`` + longest x count per micro-batch, is least (None: one batch)."""
    if overhead is None or len(lengths) < 2:
        return [list(range(len(lengths)))]
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
    best, cut = [0.0] + [math.inf] * len(order), [0] * (len(order) + 1)
    for end in range(1, len(order) + 1):
        for start in range(end):  # order[start] is the longest of order[start:end]
            cost = best[start] + overhead + lengths[order[start]] * (end - start)
            if cost < best[end]:
                best[end], cut[end] = cost, start
    groups, end = [], len(order)
    while end > 0:
        groups.append(order[cut[end]:end])
        end = cut[end]
    return groups[::-1]


def make_optimizer(adapted: Adapted, options: TrainOptions) -> EngramOptimizer:
    return EngramOptimizer(adapted.memory, lr=options.lr, extra_parameters=adapted.trainable_extra(),
                           extra_lr=options.lora_lr)


class Trainer:
    def __init__(self, adapted: Adapted, tokenizer, examples: list[Example], options: TrainOptions,
                 on_step: Callable[[StepReport], None] | None = None,
                 should_stop: Callable[[], bool] | None = None,
                 on_checkpoint: Callable[[int], None] | None = None,
                 checkpoint_dir: Path | None = None,
                 until: Callable[[int], bool] | None = None):
        """``until(step)``, called every ``options.recall_every`` steps, is the job's check that the
        facts are learned: once it returns True training goes on to :func:`trained_on_until` and
        ends there (outcome 'recalled'); the check is not asked again."""
        if not examples:
            raise ValueError("nothing to train on")
        self.adapted, self.tokenizer, self.examples, self.options = adapted, tokenizer, examples, options
        self.on_step, self.should_stop, self.on_checkpoint = on_step, should_stop, on_checkpoint
        self.checkpoint_dir, self.until = checkpoint_dir, until
        self.optimizer = make_optimizer(adapted, options)
        self.total = total_steps(options, len(examples), until_recalled=until is not None)
        self.step = 0
        self.elapsed = 0.0  # seconds of training so far, across resumes
        self.extra: dict = {}  # the job's own state kept in checkpoints (e.g. evaluation before training)
        self.learned_at: int | None = None  # the step ``until`` first said the facts are learned
        self.device = next(adapted.base.parameters()).device
        self.call_overhead = CPU_CALL_OVERHEAD if self.device.type == "cpu" else None

    # --- checkpoints ------------------------------------------------------------------------

    def save_checkpoint(self) -> None:
        with new_folder(self.checkpoint_dir) as tmp:
            self.adapted.save(tmp / ADAPTER_DIR, checkpoint=True)
            tensors, groups = {}, []
            for k, state in enumerate(self.optimizer.state_dict()):
                if "param_groups" in state:  # a torch optimiser: tensors per parameter, groups as JSON
                    for index, values in state["state"].items():
                        for name, value in values.items():
                            tensors[f"{k}.state.{index}.{name}"] = torch.as_tensor(value).detach().cpu().contiguous()
                    groups.append({"kind": "torch", "param_groups": state["param_groups"]})
                else:
                    for name, value in state.items():
                        tensors[f"{k}.{name}"] = value.detach().cpu().contiguous()
                    groups.append({"kind": "rowwise"})
            save_file(tensors, tmp / OPTIMIZER_FILE)
            (tmp / STATE_FILE).write_text(json.dumps({
                "step": self.step, "total": self.total, "elapsed": self.elapsed, "optimizers": groups,
                "learned_at": self.learned_at, "extra": self.extra}, indent=1))
        if self.on_checkpoint:
            self.on_checkpoint(self.step)

    def load_optimizer(self, folder: Path) -> None:
        """Restore step, time and optimiser state from a checkpoint (adapters are loaded by the caller)."""
        state = json.loads((folder / STATE_FILE).read_text())
        tensors = load_file(folder / OPTIMIZER_FILE)
        states = []
        for k, meta in enumerate(state["optimizers"]):
            if meta["kind"] == "torch":
                per_param: dict[int, dict] = {}
                prefix = f"{k}.state."
                for key, value in tensors.items():
                    if key.startswith(prefix):
                        index, name = key[len(prefix):].split(".", 1)
                        per_param.setdefault(int(index), {})[name] = value
                groups = meta["param_groups"]
                for group in groups:
                    if "betas" in group:
                        group["betas"] = tuple(group["betas"])
                states.append({"state": per_param, "param_groups": groups})
            else:
                states.append({name: tensors[f"{k}.{name}"] for name in ("rows", "exp_avg", "exp_avg_sq", "steps")})
        self.optimizer.load_state_dict(states)
        self.step, self.elapsed, self.extra = state["step"], state["elapsed"], state.get("extra", {})
        self.learned_at = state.get("learned_at")

    @staticmethod
    def checkpoint_state(folder: Path) -> dict | None:
        try:
            return json.loads((folder / STATE_FILE).read_text())
        except (OSError, ValueError):
            return None

    # --- the loop -----------------------------------------------------------------------------

    def time_left(self) -> float | None:
        if self.options.max_minutes is None:
            return None
        return self.options.max_minutes * 60 - self.elapsed

    def run(self) -> str:
        """Train until the steps or the time are spent, a stop is requested or the facts are learned
        (and trained on, :func:`trained_on_until`): 'finished', 'budget', 'stopped' or 'recalled'
        ('recalled' too when the cap or the budget ends a run that had learned its facts).

        Nothing here depends on how fast the machine is except the time budget (``max_minutes``):
        checkpoints are written on a timer but do not change the weights, so a run bounded by
        steps (or stopped on recall) gives the same memory on a busy machine as on an idle one.
        """
        self.adapted.train(True)
        pad = pad_id(self.tokenizer)
        last_checkpoint = time.monotonic()
        outcome = "finished"
        while self.step < self.total:
            if self.should_stop and self.should_stop():
                outcome = "stopped"
                break
            left = self.time_left()
            if left is not None and left <= 0:
                outcome = "budget"
                break
            started = time.perf_counter()
            batch = [self.examples[i] for i in batch_indices(len(self.examples), self.options.batch_size, self.step,
                                                             self.options.seed)]
            self.optimizer.zero_grad()
            loss, tokens = self._forward_backward(batch, pad)
            factor = lr_factor(self.step, self.total, self.options.lr_final)
            self.optimizer.scale_lr(factor)
            self.optimizer.step()
            seconds = time.perf_counter() - started
            self.step += 1
            self.elapsed += seconds
            per_step = self.elapsed / max(self.step, 1)
            eta = (self.total - self.step) * per_step
            left = self.time_left()
            if left is not None:
                eta = min(eta, max(left, 0.0))
            if self.on_step:
                self.on_step(StepReport(self.step, self.total, loss, self.options.lr * factor, tokens / max(seconds, 1e-9),
                                        self.elapsed, eta, self.optimizer.rows_touched))
            if self.checkpoint_dir is not None and time.monotonic() - last_checkpoint >= self.options.checkpoint_seconds:
                self.save_checkpoint()
                last_checkpoint = time.monotonic()
            if self.until is not None and self.step % self.options.recall_every == 0 and self.step < self.total:
                if self.learned_at is None:
                    started = time.perf_counter()
                    self.adapted.train(False)
                    if self.until(self.step):
                        self.learned_at = self.step
                    self.adapted.train(True)
                    self.elapsed += time.perf_counter() - started  # the budget is the user's time: checks count
                if self.learned_at is not None and self.step >= trained_on_until(self.learned_at, self.options):
                    outcome = "recalled"
                    break
        self.adapted.train(False)
        if self.learned_at is not None and outcome in ("finished", "budget"):
            outcome = "recalled"
        return outcome

    def _forward_backward(self, batch: list[Example], pad: int) -> tuple[float, int]:
        """Gradients of the batch's mean token loss, micro-batch by micro-batch; (that loss, tokens)."""
        parts = [pad_batch([batch[i] for i in group], pad, self.device)
                 for group in micro_batches([len(e.ids) for e in batch], self.call_overhead)]
        counts = [int((inputs["labels"][:, 1:] != IGNORE).sum()) for inputs in parts]
        total, loss_sum = max(sum(counts), 1), 0.0
        for inputs, count in zip(parts, counts):
            if count == 0:
                continue
            loss = self.adapted.model(**inputs).loss * (count / total)  # the model's loss is a mean over count
            if not torch.isfinite(loss):
                raise FloatingPointError(f"the loss became {float(loss)} at step {self.step + 1}: lower the learning rate")
            loss.backward()
            loss_sum += float(loss.detach())
        return loss_sum, sum(int(inputs["attention_mask"].sum()) for inputs in parts)
