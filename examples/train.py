"""Train a small multimodal model on a pipeline output: DDP, preemptible, resumable, elastic.

    torchrun --nproc_per_node 2 examples/train.py --data ./out --checkpoint ./ckpt.pt
    torchrun --nproc_per_node 2 examples/train.py --data ./out --checkpoint ./ckpt.pt --resume

A tiny CNN over the image (loaded as uint8, normalised on the device), an `nn.EmbeddingBag`
over the note's token ids, and the clinical features with their mask predict the 14
CheXpert labels, trained with a BCE loss masked where labels are missing (NaN); uncertain
labels (-1) are ignored, or read as 0 or 1 (`--uncertain`, the U-Ignore, U-Zeros and U-Ones
policies of the CheXpert paper). gloo on CPU, nccl on GPU.

Preemption: on SIGTERM (what a preemptible VM or SLURM sends; SIGUSR1 too, for SLURM's
`--signal`), each rank finishes its step; a flag all-reduced every step makes all ranks stop
after the same step; rank 0 writes a checkpoint (model, optimizer, step, loader state) and the
ranks exit 0. `--resume` continues with exactly the records the uninterrupted run would have
seen; on another number of processes (elastic), the rest of the epoch, none missing.

Copy this file and replace `MultimodalNet` with your model: the rest is the training loop.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
from pathlib import Path
from typing import Optional, Sequence

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader
from torchdata.stateful_dataloader import StatefulDataLoader

from transforms.chunks import ChunkedDataset, collate_records, normalize_images

UNCERTAIN_POLICIES = ("ignore", "zeros", "ones")
# Only what the model reads: an image not asked for is not decoded, text masks are small.
COLUMNS = ("image_tensor", "text_input_ids", "text_attention_mask", "clinical_data",
           "clinical_mask", "labels", "record_id")


class MultimodalNet(nn.Module):
    """Image, note and clinical features -> 14 label logits; small enough for CPU tests."""

    def __init__(self, n_features: int, n_labels: int = 14, vocab_size: int = 30522,
                 width: int = 32) -> None:
        super().__init__()
        self.vocab_size = vocab_size
        self.image = nn.Sequential(
            nn.Conv2d(3, 8, 5, stride=4, padding=2), nn.ReLU(),
            nn.Conv2d(8, width, 3, stride=2, padding=1), nn.ReLU(),
        )
        self.text = nn.EmbeddingBag(vocab_size, width, mode="sum")
        self.clinical = nn.Linear(2 * n_features, width)
        self.head = nn.Sequential(nn.Linear(3 * width, width), nn.ReLU(),
                                  nn.Linear(width, n_labels))

    def forward(self, batch: dict) -> torch.Tensor:
        # A mean, not AdaptiveAvgPool2d: its CUDA backward has no deterministic version.
        image = self.image(normalize_images(batch["image_tensor"])).mean(dim=(2, 3))
        # Tokens hashed into the table (any tokenizer fits); padding weighs 0, so the pad id
        # does not matter, and each note is the mean of its tokens.
        mask = batch["text_attention_mask"].float()
        weights = mask / mask.sum(dim=1, keepdim=True).clamp(min=1)
        text = self.text(batch["text_input_ids"] % self.vocab_size, per_sample_weights=weights)
        observed = batch["clinical_mask"].float()
        clinical = self.clinical(torch.cat([batch["clinical_data"] * observed, observed], 1))
        return self.head(torch.cat([image, text, F.relu(clinical)], dim=1))


def masked_bce_loss(logits: torch.Tensor, labels: torch.Tensor,
                    uncertain: str = "ignore") -> torch.Tensor:
    """BCE over the known labels: NaN (missing) never counts; -1 (uncertain) is ignored or
    read as 0 or 1 by `uncertain`. The mean over the entries that count (0 if none)."""
    if uncertain not in UNCERTAIN_POLICIES:
        raise ValueError(f"uncertain must be one of {UNCERTAIN_POLICIES}, got {uncertain!r}")
    known = ~torch.isnan(labels)
    targets = labels.nan_to_num(0.0)
    is_uncertain = labels == -1
    if uncertain == "ignore":
        known &= ~is_uncertain
    else:
        targets = torch.where(is_uncertain, 1.0 if uncertain == "ones" else 0.0, targets)
    loss = F.binary_cross_entropy_with_logits(logits, targets, reduction="none")
    # A sum of zeros where nothing counts, not NaN: the step still reaches every parameter.
    return (loss * known).sum() / known.sum().clamp(min=1)


def auroc(scores: torch.Tensor, targets: torch.Tensor) -> Optional[float]:
    """Area under the ROC curve of 0/1 `targets` (the Mann-Whitney U statistic, ties counted
    half); None without both a positive and a negative."""
    positives = int((targets == 1).sum())
    negatives = targets.numel() - positives
    if positives == 0 or negatives == 0:
        return None
    ordered, order = torch.sort(scores.double())
    _, group, counts = torch.unique_consecutive(ordered, return_inverse=True,
                                                return_counts=True)
    mean_rank = (counts.cumsum(0) - (counts - 1) / 2.0)[group]  # 1-based, ties averaged
    rank_sum = mean_rank[targets[order] == 1].sum().item()
    return (rank_sum - positives * (positives + 1) / 2) / (positives * negatives)


def auroc_per_label(logits: torch.Tensor, labels: torch.Tensor,
                    names: Sequence[str]) -> dict[str, Optional[float]]:
    """AUROC of each label over the records where it is 0 or 1 (missing and uncertain
    skipped); None where those lack a positive or a negative."""
    out = {}
    for k, name in enumerate(names):
        known = (labels[:, k] == 0) | (labels[:, k] == 1)
        out[name] = auroc(logits[known, k], labels[known, k])
    return out


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--data", required=True, help="the pipeline's --output_dir (or gs://)")
    p.add_argument("--epochs", type=int, default=1)
    p.add_argument("--max_steps", type=int, default=0,
                   help="stop after this many optimizer steps in all (0: no limit)")
    p.add_argument("--batch_size", type=int, default=32, help="per process")
    p.add_argument("--num_workers", type=int, default=2, help="DataLoader workers per process")
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--seed", type=int, default=0, help="model init and the data order")
    p.add_argument("--uncertain", choices=UNCERTAIN_POLICIES, default="ignore",
                   help="uncertain (-1) labels: ignored, or read as 0 or 1")
    p.add_argument("--vocab_size", type=int, default=30522, help="token ids hashed into this")
    p.add_argument("--checkpoint", default="", help="checkpoint file, written by rank 0")
    p.add_argument("--checkpoint_every", type=int, default=100, help="steps between them")
    p.add_argument("--resume", action="store_true", help="continue from --checkpoint")
    p.add_argument("--log_ids", default="", help="a folder: the record ids of every step, "
                   "in rank{R}.jsonl, appended to by restarts")
    p.add_argument("--metrics", default="", help="a JSONL file for rank 0's per-epoch metrics")
    # For tests: rank R sends itself SIGTERM after step K, given as "R:K", a preemption that
    # reaches one rank only at a known step.
    p.add_argument("--sigterm_at", default="", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.resume and not args.checkpoint:
        p.error("--resume needs --checkpoint")
    return args


PREEMPTION_SIGNALS = (signal.SIGTERM, signal.SIGUSR1)


def ignore_preemption_signals(worker_id: int) -> None:
    """DataLoader `worker_init_fn`: a signal sent to the whole process group (torchrun's
    agent, a VM shutdown, SLURM) must not kill the workers, whose SIGTERM handler exits and
    whose death crashes their rank mid-step; the rank stops them itself when it is done."""
    for sig in PREEMPTION_SIGNALS:
        signal.signal(sig, signal.SIG_IGN)


class Preemption:
    """Remembers a SIGTERM (or SIGUSR1); `agreed()` tells every rank whether any rank got one,
    so that all stop after the same step (a rank that stopped alone would hang the others)."""

    def __init__(self, device: torch.device) -> None:
        self.received = False
        self.device = device
        for sig in PREEMPTION_SIGNALS:
            signal.signal(sig, self._handle)

    def _handle(self, signum: int, frame: object) -> None:
        self.received = True

    def agreed(self) -> bool:
        flag = torch.tensor([int(self.received)], device=self.device)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        return bool(flag.item())


def setup_distributed() -> tuple[int, int, torch.device]:
    """Joins the torchrun job (or a job of one, run as a plain script): nccl on GPU, gloo on
    CPU. Deterministic algorithms, so that a resumed run's weights equal an uninterrupted one's."""
    os.environ.setdefault("RANK", "0")
    os.environ.setdefault("WORLD_SIZE", "1")
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", "29500")
    if torch.cuda.is_available():
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")  # deterministic cuBLAS
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
        torch.cuda.set_device(device)
        dist.init_process_group("nccl", device_id=device)
    else:
        device = torch.device("cpu")
        dist.init_process_group("gloo")
    torch.use_deterministic_algorithms(True, warn_only=device.type == "cuda")
    return dist.get_rank(), dist.get_world_size(), device


def save_checkpoint(path: str, state: dict) -> None:
    """Written whole or not at all: a preemption mid-write leaves the previous checkpoint."""
    tmp = f"{path}.tmp"
    torch.save(state, tmp)
    os.replace(tmp, path)


def to_device(batch: dict, device: torch.device) -> dict:
    return {k: v.to(device, non_blocking=True) if isinstance(v, torch.Tensor) else v
            for k, v in batch.items()}


@torch.no_grad()
def validate(model: nn.Module, data: str, batch_size: int, device: torch.device,
             rank: int, world: int) -> Optional[dict[str, Optional[float]]]:
    """AUROC per label over the val split; each rank scores every world-th record, rank 0
    gathers them. None where the output has no val records."""
    val = ChunkedDataset(data, "val", mode="map", image_dtype=torch.uint8, columns=COLUMNS)
    if len(val) == 0:
        return None
    loader = DataLoader(val, batch_size=batch_size, sampler=range(rank, len(val), world),
                        collate_fn=collate_records)
    model.eval()
    logits, labels = [], []
    for batch in loader:
        logits.append(model(to_device(batch, device)).float().cpu())
        labels.append(batch["labels"])
    model.train()
    mine = (torch.cat(logits), torch.cat(labels)) if logits else None
    gathered = [None] * world
    dist.all_gather_object(gathered, mine)
    parts = [g for g in gathered if g is not None]
    return auroc_per_label(torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts]),
                           val.metadata["label_names"])


def train(args: argparse.Namespace) -> None:
    rank, world, device = setup_distributed()
    preemption = Preemption(device)
    torch.manual_seed(args.seed)  # the same initial weights on every rank
    dataset = ChunkedDataset(args.data, "train", seed=args.seed, batch_size=args.batch_size,
                             image_dtype=torch.uint8, columns=COLUMNS)
    labels = dataset.metadata["label_names"]
    net = MultimodalNet(len(dataset.metadata["feature_names"]), len(labels), args.vocab_size)
    model = DistributedDataParallel(net.to(device))
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr)
    loader = StatefulDataLoader(dataset, batch_size=args.batch_size,
                                num_workers=args.num_workers, collate_fn=collate_records,
                                worker_init_fn=ignore_preemption_signals,
                                pin_memory=device.type == "cuda")
    step = epoch = 0
    if args.resume:
        ckpt = torch.load(args.checkpoint, map_location=device, weights_only=True)
        net.load_state_dict(ckpt["model"])
        optimizer.load_state_dict(ckpt["optimizer"])
        step, epoch = ckpt["step"], ckpt["epoch"]
        if ckpt["epoch_done"]:
            epoch += 1
        elif (ckpt["world_size"], ckpt["num_workers"]) == (world, args.num_workers):
            loader.load_state_dict(ckpt["loader"])  # exactly where each worker stood
        else:
            dataset.load_state_dict(ckpt["loader"])  # elastic: the epoch's positions left
    sigterm_rank, _, sigterm_step = args.sigterm_at.partition(":")
    ids_log = None
    if args.log_ids:
        os.makedirs(args.log_ids, exist_ok=True)
        ids_log = open(Path(args.log_ids) / f"rank{rank}.jsonl", "a")

    def checkpoint(epoch_done: bool) -> None:
        if args.checkpoint and rank == 0:
            save_checkpoint(args.checkpoint, {
                "model": net.state_dict(), "optimizer": optimizer.state_dict(),
                "step": step, "epoch": epoch, "epoch_done": epoch_done,
                "loader": loader.state_dict(), "world_size": world,
                "num_workers": args.num_workers,
            })
        dist.barrier()  # no rank exits before the checkpoint is whole

    stopped = False
    while epoch < args.epochs and not stopped:
        dataset.set_epoch(epoch)
        for batch in loader:
            loss = masked_bce_loss(model(to_device(batch, device)),
                                   batch["labels"].to(device), args.uncertain)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            step += 1
            if ids_log is not None:
                ids_log.write(json.dumps({"step": step, "epoch": epoch,
                                          "ids": batch["record_id"]}) + "\n")
                ids_log.flush()
            if args.sigterm_at and rank == int(sigterm_rank) and step == int(sigterm_step):
                os.kill(os.getpid(), signal.SIGTERM)
            if preemption.agreed():
                checkpoint(epoch_done=False)
                if rank == 0:
                    print(f"preempted: checkpoint at step {step}", flush=True)
                stopped = True
                break
            if step == args.max_steps:
                checkpoint(epoch_done=False)
                stopped = True
                break
            if step % args.checkpoint_every == 0:
                checkpoint(epoch_done=False)
        if stopped:
            break
        scores = validate(model, args.data, args.batch_size, device, rank, world)
        if rank == 0:
            line = json.dumps({"epoch": epoch, "step": step, "val_auroc": scores})
            print(line, flush=True)
            if args.metrics:
                with open(args.metrics, "a") as f:
                    f.write(line + "\n")
        checkpoint(epoch_done=True)
        epoch += 1
    if ids_log is not None:
        ids_log.close()
    dist.destroy_process_group()


def main(argv: Optional[Sequence[str]] = None) -> int:
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    train(parse_args(argv))
    return 0


if __name__ == "__main__":
    sys.exit(main())
