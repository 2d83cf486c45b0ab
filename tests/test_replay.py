"""Replay: pretraining windows mixed into every fine-tuning batch (gptlib.data.with_replay)."""
import torch

from gptlib import Example, GPTModel, TrainConfig, instruction_loader, train, with_replay
from gptlib.checkpoint import read_checkpoint
from gptlib.data import ReplayLoader
from gptlib.tokenizer import encode
from gptlib.train import batch_loss

from conftest import tiny_config
from test_train import interrupt_at

TEXT = " ".join(f"line {i} of a small corpus about cats and dogs." for i in range(80))


def _examples(n=24):
    return [Example(f"Say {i}.", "", f"{i} {i + 1}") for i in range(n)]


def _loader(seed=5):
    return with_replay(instruction_loader(_examples(), batch_size=4, max_length=64, seed=seed), encode(TEXT),
                       length=16, windows_per_batch=2, weight=0.5, seed=seed)


def test_every_batch_is_the_task_batch_plus_replay_windows():
    loader = _loader()
    plain = instruction_loader(_examples(), batch_size=4, max_length=64, seed=5)
    assert len(loader) == len(plain)
    for epoch in (0, 1):
        loader.set_epoch(epoch)
        plain.batch_sampler.set_epoch(epoch)
        for mixed, task in zip(loader, plain):
            assert torch.equal(mixed["input_ids"], task["input_ids"]) and torch.equal(mixed["labels"], task["labels"])
            assert mixed["replay_input_ids"].shape == (2, 16)
            assert torch.equal(mixed["replay_labels"][:, :-1], mixed["replay_input_ids"][:, 1:])  # shifted by one


def test_replay_windows_depend_only_on_the_epoch_and_position():
    a, b = _loader(), _loader()
    b.set_epoch(1)
    list(b)  # another epoch iterated in between changes nothing
    b.set_epoch(0)
    first = [x["replay_input_ids"] for x in a]
    assert all(torch.equal(x, y["replay_input_ids"]) for x, y in zip(first, b))
    a.set_epoch(1)
    assert not all(torch.equal(x, y["replay_input_ids"]) for x, y in zip(first, a))


def test_the_loss_adds_the_weighted_replay_loss():
    torch.manual_seed(0)
    model = GPTModel(tiny_config(context_length=64))
    batch = next(iter(_loader()))
    loss, n_tokens = batch_loss(model, batch, "cpu")
    task = model.loss(batch["input_ids"], batch["labels"], batch["attention_mask"])
    replay = model.loss(batch["replay_input_ids"], batch["replay_labels"])
    torch.testing.assert_close(loss, task + 0.5 * replay)
    assert n_tokens == int((batch["labels"] != -100).sum()) + batch["replay_labels"].numel()


def test_a_resumed_replay_run_matches_an_uninterrupted_one(tmp_path):
    def run(name, resume=None, on_step=None):
        torch.manual_seed(0)
        model = GPTModel(tiny_config(context_length=64))
        cfg = TrainConfig(epochs=3, lr=3e-3, eval_every=4, eval_batches=2, checkpoint_path=str(tmp_path / name),
                          progress=False, device="cpu")
        return model, train(model, _loader(), cfg=cfg, resume=resume, on_step=on_step)

    full_model, full = run("full.pth")
    _, cut = run("cut.pth", on_step=interrupt_at(7))
    assert cut.interrupted
    resumed_model, resumed = run("cut.pth", resume=read_checkpoint(tmp_path / "cut.pth"))
    assert resumed.steps == full.steps
    for (name, a), b in zip(full_model.state_dict().items(), resumed_model.state_dict().values()):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-6, msg=name)
    assert isinstance(_loader(), ReplayLoader)
