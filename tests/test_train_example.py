"""examples/train.py as users run it: 2-process gloo torchrun, preempted by SIGTERM at a known
step, resumed on 2 processes and on 1 (elastic); and its masked loss and AUROC."""

from __future__ import annotations

import collections
import json
import math
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from examples.train import auroc, auroc_per_label, masked_bce_loss
from tests.chunk_fixtures import LABEL_NAMES, write_dataset

REPO = Path(__file__).resolve().parents[1]
N_TRAIN, BATCH = 96, 4  # 2 ranks x 4 records: 12 steps an epoch
STEPS, PREEMPT_AT = 30, 17  # step 17 is the 5th of epoch 1; step 30 the 6th of epoch 2


@pytest.fixture(scope="module")
def output(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("train") / "out"
    write_dataset(root, {"train": N_TRAIN, "val": 24, "test": 0}, chunk_size=8, image_size=32)
    return root


def command(nproc: int, output: Path, run: Path, *extra: str) -> list[str]:
    """examples/train.py under torchrun, with its ids log and checkpoint in `run`."""
    return [sys.executable, "-m", "torch.distributed.run", "--standalone",
           f"--nproc_per_node={nproc}", str(REPO / "examples" / "train.py"),
           "--data", str(output), "--batch_size", str(BATCH), "--num_workers", "1",
           "--epochs", "3", "--max_steps", str(STEPS), "--checkpoint_every", "5",
           "--checkpoint", str(run / "ckpt.pt"), "--log_ids", str(run / "ids"),
           "--metrics", str(run / "metrics.jsonl"), *extra]


ENV = os.environ | {"OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}


def torchrun(nproc: int, output: Path, run: Path, *extra: str) -> subprocess.CompletedProcess:
    done = subprocess.run(command(nproc, output, run, *extra), cwd=REPO, env=ENV,
                          capture_output=True, text=True, timeout=180)
    assert done.returncode == 0, done.stdout + done.stderr
    return done


def steps(run: Path, rank: int) -> list[dict]:
    lines = (run / "ids" / f"rank{rank}.jsonl").read_text().splitlines()
    return [json.loads(line) for line in lines]


def weights(run: Path) -> dict:
    return torch.load(run / "ckpt.pt", weights_only=True)


@pytest.fixture(scope="module")
def uninterrupted(output: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    run = tmp_path_factory.mktemp("uninterrupted")
    torchrun(2, output, run)
    return run


@pytest.fixture(scope="module")
def preempted(output: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A run whose rank 1 alone receives SIGTERM after step 17."""
    run = tmp_path_factory.mktemp("preempted")
    done = torchrun(2, output, run, "--sigterm_at", f"1:{PREEMPT_AT}")
    assert f"preempted: checkpoint at step {PREEMPT_AT}" in done.stdout
    return run


def test_preempted_run_stops_every_rank_after_the_step_and_checkpoints(preempted: Path) -> None:
    ckpt = weights(preempted)
    assert (ckpt["step"], ckpt["epoch"], ckpt["epoch_done"]) == (PREEMPT_AT, 1, False)
    assert [len(steps(preempted, rank)) for rank in (0, 1)] == [PREEMPT_AT, PREEMPT_AT]
    assert not list(preempted.glob("*.tmp"))  # written through a temp file, then replaced


def test_resume_sees_the_uninterrupted_records_and_reaches_its_weights(
    output: Path, uninterrupted: Path, preempted: Path, tmp_path: Path
) -> None:
    run = Path(shutil.copytree(preempted, tmp_path / "resumed"))
    torchrun(2, output, run, "--resume")
    for rank in (0, 1):
        assert steps(run, rank) == steps(uninterrupted, rank)  # step, epoch and ids
        assert len(steps(run, rank)) == STEPS
    resumed, reference = weights(run), weights(uninterrupted)
    assert resumed["step"] == reference["step"] == STEPS
    torch.testing.assert_close(resumed["model"], reference["model"])
    # The interrupted weights were not already the final ones: the comparison can fail.
    assert not torch.equal(weights(preempted)["model"]["head.2.weight"],
                           reference["model"]["head.2.weight"])


def test_sigterm_to_torchrun_mid_epoch_checkpoints_and_resumes_exactly(
    output: Path, uninterrupted: Path, tmp_path: Path
) -> None:
    """SIGTERM to the torchrun agent, which passes it to each rank's whole process group,
    DataLoader workers included (as a VM shutdown or SLURM would): the ranks stop after a
    common step and checkpoint; the resumed run matches the uninterrupted one."""
    run = tmp_path / "signalled"
    proc = subprocess.Popen(command(2, output, run), cwd=REPO, env=ENV, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    log = run / "ids" / "rank0.jsonl"
    deadline = time.monotonic() + 120
    while not (log.exists() and len(log.read_text().splitlines()) >= 3):
        assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()
        time.sleep(0.01)
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=120)
    # The agent re-raises the signal once its ranks are done (exit 1); a rank that crashed
    # would show in its "[rankN]:" error output.
    assert "preempted: checkpoint at step" in out and "[rank" not in err, out + err
    stopped = weights(run)["step"]
    assert 3 <= stopped < STEPS, "the run ended before the signal: nothing was tested"
    assert [len(steps(run, rank)) for rank in (0, 1)] == [stopped, stopped]
    torchrun(2, output, run, "--resume")
    for rank in (0, 1):
        assert steps(run, rank) == steps(uninterrupted, rank)
    torch.testing.assert_close(weights(run)["model"], weights(uninterrupted)["model"])


def test_resume_on_one_process_covers_the_rest_of_the_epoch(
    output: Path, preempted: Path, tmp_path: Path
) -> None:
    run = Path(shutil.copytree(preempted, tmp_path / "elastic"))
    torchrun(1, output, run, "--resume", "--epochs", "2", "--max_steps", "0")  # to the end
    epoch1 = [rid for rank in (0, 1) for s in steps(preempted, rank) if s["epoch"] == 1
              for rid in s["ids"]]
    after = steps(run, 0)[PREEMPT_AT:]  # rank 0's log goes on where the 2-rank run stopped
    assert {s["epoch"] for s in after} == {1}
    seen = collections.Counter(epoch1 + [rid for s in after for rid in s["ids"]])
    # 96 - 5 steps x 2 ranks x 4 = 56 left for one rank: no padding, so each record once.
    assert seen == collections.Counter(f"dicom-{n:05d}" for n in range(N_TRAIN))
    assert len(after) == math.ceil((N_TRAIN - 2 * BATCH * 5) / BATCH)


def test_validation_reports_auroc_per_label_each_epoch(uninterrupted: Path) -> None:
    lines = [json.loads(x) for x in (uninterrupted / "metrics.jsonl").read_text().splitlines()]
    assert [line["epoch"] for line in lines] == [0, 1]  # epoch 2 stops at --max_steps
    for line in lines:
        assert list(line["val_auroc"]) == LABEL_NAMES
        assert all(0.0 <= v <= 1.0 for v in line["val_auroc"].values())


NAN, U = float("nan"), -1.0


@pytest.mark.parametrize("policy,targets,counted", [
    ("ignore", [1.0, 0.0, 0.0, 0.0], [True, True, False, False]),
    ("zeros", [1.0, 0.0, 0.0, 0.0], [True, True, True, False]),
    ("ones", [1.0, 0.0, 1.0, 0.0], [True, True, True, False]),
])
def test_masked_loss_ignores_missing_and_applies_the_uncertain_policy(
    policy: str, targets: list[float], counted: list[bool]
) -> None:
    logits = torch.tensor([[0.3, -1.2, 2.0, 5.0]])
    labels = torch.tensor([[1.0, 0.0, U, NAN]])
    keep = torch.tensor([counted])
    expected = F.binary_cross_entropy_with_logits(logits[keep], torch.tensor([targets])[keep])
    loss = masked_bce_loss(logits, labels, policy)
    torch.testing.assert_close(loss, expected)
    logits.requires_grad_(True)
    masked_bce_loss(logits, labels, policy).backward()
    assert torch.equal(logits.grad[0] != 0, keep[0])  # nothing learnt from what is ignored


def test_masked_loss_with_nothing_known_is_zero_and_bad_policy_is_refused() -> None:
    loss = masked_bce_loss(torch.ones(2, 3), torch.tensor([[NAN, U, NAN], [NAN, NAN, U]]))
    assert loss.item() == 0.0
    with pytest.raises(ValueError, match="uncertain must be one of"):
        masked_bce_loss(torch.ones(1, 1), torch.ones(1, 1), "positive")


def test_auroc() -> None:
    targets = torch.tensor([0.0, 0.0, 1.0, 1.0])
    assert auroc(torch.tensor([0.1, 0.4, 0.35, 0.8]), targets) == 0.75
    assert auroc(torch.tensor([0.1, 0.2, 0.3, 0.4]), targets) == 1.0
    assert auroc(torch.tensor([0.4, 0.3, 0.2, 0.1]), targets) == 0.0
    assert auroc(torch.tensor([0.5, 0.2, 0.5, 0.9]), targets) == 0.875  # a tie counts half
    assert auroc(torch.tensor([0.1, 0.2]), torch.tensor([1.0, 1.0])) is None


def test_auroc_per_label_skips_missing_and_uncertain_labels() -> None:
    logits = torch.tensor([[0.1, 0.9], [0.8, 0.2], [0.3, 0.5], [0.7, 0.4]])
    labels = torch.tensor([[0.0, 1.0], [1.0, NAN], [U, 0.0], [NAN, U]])
    scores = auroc_per_label(logits, labels, ["a", "b"])
    assert scores == {"a": 1.0, "b": 1.0}  # a: records 0 and 1; b: 0 and 2
    assert auroc_per_label(logits, torch.full((4, 2), NAN), ["a", "b"]) == {"a": None,
                                                                            "b": None}
