"""The training loop: AdamW, linear warmup then cosine decay, gradient accumulation, gradient clipping,
optional bfloat16 autocast and activation checkpointing, periodic validation, a progress bar, a JSONL log, a
PNG loss curve, and a checkpoint of the training state that `resume` continues from exactly.

The loss of an optimizer step is the mean over the response tokens of all its micro-batches (each micro-batch
adds its summed loss divided by the step's token count), so accumulating 4 micro-batches gives the gradient of
one batch of 4, whatever their lengths.
"""

import json
import math
import time
from dataclasses import asdict, dataclass
from functools import partial
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint
from tqdm import tqdm

from modelcode.training.data import IGNORE, Example, collate


@dataclass
class TrainConfig:
    epochs: int = 1
    max_steps: int | None = None  # optimizer steps; None: as many as `epochs` take
    batch_size: int = 4  # examples per micro-batch
    grad_accum: int = 1  # micro-batches per optimizer step
    lr: float = 3e-4
    min_lr_ratio: float = 0.1  # the cosine ends at lr * min_lr_ratio
    warmup_steps: int = 10
    weight_decay: float = 0.0
    clip: float | None = 1.0  # max gradient norm
    eval_every: int = 50  # steps between validations (and one at the end)
    save_every: int | None = None  # steps between training-state checkpoints (and one at the end, and on Ctrl-C)
    seed: int = 0
    autocast: bool = False  # bfloat16 autocast of the forward pass
    checkpoint_activations: bool = False


def lr_factor(step: int, warmup: int, total: int, min_ratio: float) -> float:
    """The learning rate of optimizer step `step` (0-based) as a fraction of the peak."""
    if step < warmup:
        return (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * min(progress, 1.0)))


def checkpoint_activations(model: nn.Module) -> None:
    """Recompute each transformer block's activations in the backward pass instead of keeping them: the
    memory of one block's activations instead of all of them, for about one more forward pass of compute.
    Applied by replacing each block's bound `forward` (names and weights stay as they are)."""
    for block in model.layers:
        block.forward = partial(checkpoint, block.forward, use_reentrant=False)


def loss_sum(model: nn.Module, batch: dict[str, torch.Tensor], autocast: bool) -> torch.Tensor:
    """Summed cross-entropy of the batch's target tokens. The output layer runs only at positions that have a
    target: the prompt tokens an SFT batch masks (often half of it) cost it no work, forward or backward."""
    device = next(model.parameters()).device
    targets = batch["targets"].to(device).flatten()
    keep = (targets != IGNORE).nonzero().squeeze(1)
    with torch.autocast(device.type, dtype=torch.bfloat16, enabled=autocast):
        h = model.hidden_states(batch["tokens"].to(device), batch["positions"].to(device))  # (B, T, dim)
        logits = model.logits(h.flatten(0, 1).index_select(0, keep))  # (targets, V)
    return F.cross_entropy(logits.float(), targets[keep], reduction="sum")


def n_targets(batch: dict[str, torch.Tensor]) -> int:
    return int((batch["targets"] != IGNORE).sum())


def plan(n_examples: int, cfg: TrainConfig) -> list[list[list[int]]]:
    """The example indices of every micro-batch of every optimizer step, in order: a fresh shuffle each epoch
    (seeded), so a run and a resumed run see the same batches."""
    micro = []
    for epoch in range(cfg.epochs if cfg.max_steps is None else 10**9):
        order = torch.randperm(n_examples, generator=torch.Generator().manual_seed(cfg.seed + epoch)).tolist()
        micro += [order[i: i + cfg.batch_size] for i in range(0, n_examples, cfg.batch_size)]
        if cfg.max_steps is not None and len(micro) >= cfg.max_steps * cfg.grad_accum:
            break
    steps = [micro[i: i + cfg.grad_accum] for i in range(0, len(micro) - cfg.grad_accum + 1, cfg.grad_accum)]
    return steps[: cfg.max_steps] if cfg.max_steps is not None else steps


@torch.no_grad()
def evaluate(model: nn.Module, examples: list[Example], batch_size: int, autocast: bool,
             pad_id: int = 0) -> dict[str, float]:
    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    for i in range(0, len(examples), batch_size):
        batch = collate(examples[i: i + batch_size], pad_id)
        total += float(loss_sum(model, batch, autocast))
        count += n_targets(batch)
    model.train(was_training)
    loss = total / max(count, 1)
    return {"val_loss": loss, "val_ppl": math.exp(min(loss, 50.0))}


class Trainer:
    """Trains the parameters of `model` that require grad on `train` examples, validating on `val`; writes
    `out/log.jsonl`, `out/loss.png` and the training state `out/training/state.pt`."""

    def __init__(self, model: nn.Module, train: list[Example], val: list[Example], cfg: TrainConfig, out: str | Path,
                 pad_id: int = 0):
        self.model, self.train_set, self.val_set, self.cfg, self.pad_id = model, train, val, cfg, pad_id
        self.out = Path(out)
        if not train:
            raise ValueError("no training examples: give more records, or hold fewer out (--val-fraction)")
        self.params = {n: p for n, p in model.named_parameters() if p.requires_grad}
        if not self.params:
            raise ValueError("no parameter requires grad: nothing to train")
        self.steps = plan(len(train), cfg)
        if not self.steps:
            raise ValueError(f"{len(train)} training examples make no optimizer step of {cfg.grad_accum} "
                             f"micro-batch(es) of {cfg.batch_size}: lower --batch-size or --grad-accum")
        self.optimizer = torch.optim.AdamW(self.params.values(), lr=cfg.lr, weight_decay=cfg.weight_decay)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, partial(
            lr_factor, warmup=cfg.warmup_steps, total=len(self.steps), min_ratio=cfg.min_lr_ratio))
        self.step, self.log = 0, []
        if cfg.checkpoint_activations:
            checkpoint_activations(model)

    def run(self, resume: bool = False) -> list[dict]:
        """Train to the last step (from the saved state with `resume`); returns the log records."""
        self.out.mkdir(parents=True, exist_ok=True)
        if resume:
            self.resume()
        else:
            torch.manual_seed(self.cfg.seed)  # dropout's random stream
            (self.out / "log.jsonl").write_text("")
            if self.val_set:  # where validation starts from
                self._write({"step": 0} | evaluate(self.model, self.val_set, self.cfg.batch_size, self.cfg.autocast,
                                                   self.pad_id))
        self.model.train()
        self.rng = torch.get_rng_state()  # the random stream where the next step begins
        bar = tqdm(total=len(self.steps), initial=self.step, desc="fine-tuning", unit="step")
        try:
            while self.step < len(self.steps):
                self._advance(bar)
        except KeyboardInterrupt:
            self.save_state()  # as after the last whole step: --resume goes on from there
            raise
        finally:
            bar.close()
        self.model.eval()
        plot_losses(self.log, self.out / "loss.png")
        return self.log

    def _advance(self, bar: tqdm) -> None:
        """One optimizer step, then validation, the log, the progress bar and the state, when due."""
        record = self.train_step(self.steps[self.step])
        self.step += 1
        self.rng = torch.get_rng_state()
        last = self.step == len(self.steps)
        if self.val_set and (self.step % self.cfg.eval_every == 0 or last):
            record |= evaluate(self.model, self.val_set, self.cfg.batch_size, self.cfg.autocast, self.pad_id)
        self._write(record)
        bar.set_postfix(loss=f"{record['loss']:.3f}", tok_s=f"{record['tokens_per_s']:.0f}")
        bar.update()
        if last or (self.cfg.save_every and self.step % self.cfg.save_every == 0):
            self.save_state()

    def backward(self, micro_batches: list[list[int]]) -> float:
        """Accumulate the gradient of one optimizer step's loss over its micro-batches; returns the loss."""
        batches = [collate([self.train_set[i] for i in idx], self.pad_id) for idx in micro_batches]
        count = max(sum(n_targets(b) for b in batches), 1)
        total = 0.0
        for batch in batches:
            loss = loss_sum(self.model, batch, self.cfg.autocast) / count
            loss.backward()
            total += float(loss.detach())
        return total

    def train_step(self, micro_batches: list[list[int]]) -> dict:
        start = time.perf_counter()
        total = self.backward(micro_batches)
        if self.cfg.clip is not None:
            torch.nn.utils.clip_grad_norm_(self.params.values(), self.cfg.clip)
        lr = self.scheduler.get_last_lr()[0]
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        seconds = time.perf_counter() - start
        inputs = sum(len(self.train_set[i].tokens) for idx in micro_batches for i in idx)  # padding not counted
        return {"step": self.step + 1, "loss": total, "lr": lr, "tokens": inputs,
                "tokens_per_s": inputs / seconds, "seconds": seconds}

    def _write(self, record: dict) -> None:
        self.log.append(record)
        with open(self.out / "log.jsonl", "a") as f:
            f.write(json.dumps(record) + "\n")

    def save_state(self) -> Path:
        """Everything a resumed run needs to continue as if it had not stopped."""
        path = self.out / "training" / "state.pt"
        path.parent.mkdir(parents=True, exist_ok=True)
        state = {"step": self.step, "config": asdict(self.cfg), "params": {n: p.detach() for n, p in
                                                                          self.params.items()},
                 "optimizer": self.optimizer.state_dict(), "scheduler": self.scheduler.state_dict(),
                 "rng": self.rng, "log": self.log}
        torch.save(state, path.with_suffix(".tmp"))
        path.with_suffix(".tmp").replace(path)  # never a half-written state
        return path

    def resume(self) -> None:
        """Put the parameters, optimizer, schedule, step, log and random stream back as `save_state` left them."""
        path = self.out / "training" / "state.pt"
        if not path.exists():
            raise FileNotFoundError(f"nothing to resume: no {path} (run without --resume to start)")
        state = torch.load(path, weights_only=True)
        changed = {k: (v, state["config"].get(k)) for k, v in asdict(self.cfg).items() if state["config"].get(k) != v}
        if changed:
            said = ", ".join(f"{k}: {b} there, {a} now" for k, (a, b) in changed.items())
            raise ValueError(f"{path} was written with other settings ({said}): resume with the same ones")
        missing = set(self.params) ^ set(state["params"])
        if missing:
            raise ValueError(f"{path} trains other parameters than this model ({sorted(missing)[0]!r}...): "
                             "resume with the same model and method")
        with torch.no_grad():
            for n, p in self.params.items():
                p.copy_(state["params"][n])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.step, self.log = state["step"], state["log"]
        (self.out / "log.jsonl").write_text("".join(json.dumps(r) + "\n" for r in self.log))
        torch.set_rng_state(state["rng"])


def plot_losses(log: list[dict], path: Path) -> None:
    """Training loss per step and validation loss where measured, in one PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.5), dpi=100)
    train = [r for r in log if "loss" in r]
    ax.plot([r["step"] for r in train], [r["loss"] for r in train], label="train", lw=1)
    val = [r for r in log if "val_loss" in r]
    if val:
        ax.plot([r["step"] for r in val], [r["val_loss"] for r in val], "o-", label="validation")
    ax.set(xlabel="optimizer step", ylabel="loss (nats per response token)")
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
