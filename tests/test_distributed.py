"""Training with several processes, as users launch it: real torchrun processes talking over gloo on the CPU.

Two processes must train exactly as one (each optimizer step sees the same examples), end with the same weights
on every rank, let rank 0 alone write, stop and resume together, and report a bad input once.
"""

import json
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from gptlib import GPTModel, save_checkpoint
from gptlib.cli import main

from conftest import ROOT, assert_weights_close, tiny_config

SARCASM = ROOT / "dataset" / "sarcasm" / "sarcasm_instruction_pairs.jsonl"
WORKER = Path(__file__).with_name("distributed_worker.py")
TORCHRUN = [sys.executable, "-m", "torch.distributed.run"]
TIMEOUT = 1800  # seconds: only against a hung collective, never a speed check


def torchrun(args, cwd, nproc=2, launcher=("--standalone",), **popen):
    command = [*TORCHRUN, *launcher, "--nproc_per_node", str(nproc), *map(str, args)]
    return subprocess.run(command, cwd=cwd, capture_output=True, text=True, timeout=TIMEOUT, **popen)


def gptlib_args(*args):
    return ["-m", "gptlib", *args]


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    d = tmp_path_factory.mktemp("ddp")
    text = (ROOT / "dataset" / "pretraining" / "shakespeare_train.txt").read_text(encoding="utf-8")
    (d / "train.txt").write_text(text[:60_000], encoding="utf-8")
    (d / "val.txt").write_text(text[-20_000:], encoding="utf-8")
    lines = SARCASM.read_text(encoding="utf-8").splitlines()[:60]
    (d / "pairs.jsonl").write_text("\n".join(lines) + "\n", encoding="utf-8")
    torch.manual_seed(0)
    save_checkpoint(d / "base.pth", GPTModel(tiny_config(context_length=128, drop_rate=0.0)))
    return d


PRETRAIN = ["pretrain", "--data", "train.txt", "--val-data", "val.txt", "--context-length", "32", "--emb-dim", "32",
            "--n-layers", "2", "--n-heads", "2", "--drop-rate", "0", "--vocab-size", "300", "--batch-size", "6",
            "--lr", "3e-3", "--warmup-steps", "0", "--precision", "fp32", "--quiet"]
COMMANDS = {
    "pretrain": PRETRAIN + ["--max-steps", "8", "--eval-every", "4"],
    "finetune": ["finetune", "--checkpoint", "base.pth", "--data", "pairs.jsonl", "--max-steps", "6",
                 "--eval-every", "3", "--batch-size", "5", "--lr", "3e-3", "--precision", "fp32", "--quiet"],
    "finetune-lora": ["finetune", "--checkpoint", "base.pth", "--data", "pairs.jsonl", "--lora-rank", "4",
                      "--max-steps", "6", "--eval-every", "3", "--batch-size", "5", "--lr", "3e-3",
                      "--precision", "fp32", "--quiet"],
    "classify": ["classify", "train", "--checkpoint", "base.pth", "--data", "pairs.jsonl", "--max-steps", "6",
                 "--eval-every", "3", "--batch-size", "7", "--lr", "3e-3", "--precision", "fp32", "--quiet"],
}


def weights(path: Path) -> dict:
    saved = torch.load(path, weights_only=True)
    return saved.get("model_state_dict", saved.get("adapter_state_dict"))


def in_folder(workdir, monkeypatch, argv):
    monkeypatch.chdir(workdir)
    return main([str(a) for a in argv])


@pytest.mark.parametrize("name", list(COMMANDS))
def test_two_processes_train_as_one_and_only_rank_0_writes(workdir, monkeypatch, name):
    one, two = workdir / f"{name}-1", workdir / f"{name}-2"
    one.mkdir(), two.mkdir()
    assert in_folder(workdir, monkeypatch, COMMANDS[name] + ["--out", one / "model.pth"]) == 0
    run = torchrun(gptlib_args(*COMMANDS[name], "--out", two / "model.pth"), cwd=workdir)
    assert run.returncode == 0, run.stderr
    assert_weights_close(weights(one / "model.pth"), weights(two / "model.pth"), rtol=1e-5)
    # rank 0 alone logged and wrote: the outputs of one run, and no lock, progress or temporary file
    assert sorted(p.name for p in two.iterdir()) == ["model.loss.png", "model.metrics.json", "model.pth"]
    assert run.stderr.count("data:") == 1 and run.stderr.count("wrote ") == 1
    metrics = [json.loads((d / "model.metrics.json").read_text()) for d in (one, two)]
    assert metrics[0]["processes"] == 1 and metrics[1]["processes"] == 2
    assert metrics[1]["history"]["step"] == metrics[0]["history"]["step"]
    for key in ("train_loss", "val_loss"):  # losses averaged over the processes are the one process's losses
        assert metrics[1]["history"][key] == pytest.approx(metrics[0]["history"][key], rel=1e-5)


def test_every_process_ends_with_the_same_weights(tmp_path):
    run = torchrun([WORKER, "train", tmp_path], cwd=ROOT)
    assert run.returncode == 0, run.stderr
    rank0, rank1 = (torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in (0, 1))
    assert rank0.keys() == rank1.keys()
    for name, tensor in rank0.items():
        assert torch.equal(tensor, rank1[name]), name


def test_an_interrupted_torchrun_run_resumes_to_the_weights_of_an_uninterrupted_one(workdir):
    args = PRETRAIN + ["--max-steps", "300", "--eval-every", "100", "--save-every", "10"]
    full = torchrun(gptlib_args(*args, "--out", "full.pth"), cwd=workdir)
    assert full.returncode == 0, full.stderr
    command = [*TORCHRUN, "--standalone", "--nproc_per_node", "2", *gptlib_args(*args, "--out", "cut.pth")]
    launcher = subprocess.Popen(command, cwd=workdir, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + TIMEOUT
    while not (workdir / "cut.progress.pth").exists() and launcher.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    launcher.send_signal(signal.SIGTERM)  # what `timeout`, Slurm and Ctrl-C's launcher send
    _, stderr = launcher.communicate(timeout=TIMEOUT)
    assert "progress saved in cut.progress.pth" in stderr, stderr
    assert not (workdir / "cut.pth").exists()
    stopped_at = torch.load(workdir / "cut.progress.pth", weights_only=True)["train_state"]["step"]
    assert 0 < stopped_at < 300
    resumed = torchrun(gptlib_args(*args, "--out", "cut.pth", "--resume"), cwd=workdir)
    assert resumed.returncode == 0, resumed.stderr
    assert_weights_close(weights(workdir / "full.pth"), weights(workdir / "cut.pth"), rtol=1e-6)
    assert not (workdir / "cut.progress.pth").exists()


def error_lines(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if line.startswith("error:")]


def test_a_bad_input_is_reported_once_and_writes_nothing(workdir):
    out = workdir / "bad"
    out.mkdir()
    (out / "model.pth").write_bytes(b"an earlier model")
    cases = {  # each meets every process alike: in the flags, in set-up, in training
        "--lr nan": COMMANDS["pretrain"] + ["--lr", "nan", "--out", out / "new.pth"],
        "existing --out": COMMANDS["finetune"] + ["--out", out / "model.pth"],
        "too few examples": COMMANDS["finetune"] + ["--batch-size", "1", "--out", out / "new.pth"],
        "diverged": PRETRAIN + ["--max-steps", "20", "--lr", "1e30", "--out", out / "new.pth"],
    }
    for case, args in cases.items():
        run = torchrun(gptlib_args(*args), cwd=workdir)
        assert run.returncode != 0, case
        assert len(error_lines(run.stderr)) == 1, (case, run.stderr)
        assert sorted(p.name for p in out.iterdir()) == ["model.pth"], case
    assert (out / "model.pth").read_bytes() == b"an earlier model"
    run = torchrun(gptlib_args("generate", "--checkpoint", "base.pth", "hello"), cwd=workdir)
    assert error_lines(run.stderr) == ["error: gptlib generate runs in one process; under torchrun run pretrain, "
                                       "finetune or classify train, and run gptlib generate on its own"]


@pytest.mark.parametrize("mode, message", [("fail-on-rank-1", "data.txt: rank 1 cannot read its copy"),
                                           ("fail-on-rank-0-in-training", "the disk is full (rank 0, while training)")])
def test_a_failure_in_one_process_is_reported_by_that_process_alone(tmp_path, mode, message):
    run = torchrun([WORKER, mode, tmp_path], cwd=ROOT)
    assert run.returncode != 0
    assert error_lines(run.stderr) == [f"error: {message}"]
    assert "OtherRankFailed" not in run.stderr and "[rank0]" not in run.stderr and "[rank1]" not in run.stderr
    assert not list(tmp_path.iterdir())


def test_processes_that_read_different_data_refuse_to_train(tmp_path):
    run = torchrun([WORKER, "other-data-on-rank-1", tmp_path], cwd=ROOT)
    assert run.returncode != 0
    assert len(error_lines(run.stderr)) == 1 and "read different training data" in run.stderr
    assert not list(tmp_path.iterdir())


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_machines_train_as_one(workdir, monkeypatch):
    """Multi-node: two torchrun launchers (one per machine, here both on this one) with one process each."""
    out = workdir / "nodes"
    out.mkdir()
    args = COMMANDS["pretrain"]
    assert in_folder(workdir, monkeypatch, args + ["--out", out / "one.pth"]) == 0
    port = free_port()
    nodes = [subprocess.Popen([*TORCHRUN, "--nnodes", "2", "--node_rank", str(rank), "--nproc_per_node", "1",
                               "--master_addr", "127.0.0.1", "--master_port", str(port),
                               *gptlib_args(*args, "--out", out / "two.pth")],
                              cwd=workdir, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for rank in (1, 0)]
    outputs = [node.communicate(timeout=TIMEOUT) for node in nodes]
    assert [node.returncode for node in nodes] == [0, 0], outputs
    assert_weights_close(weights(out / "one.pth"), weights(out / "two.pth"), rtol=1e-5)
    assert "wrote" in outputs[1][1] and "wrote" not in outputs[0][1]  # the machine of rank 0 writes
