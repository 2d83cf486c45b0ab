import pytest
import torch
from torch.utils.data import DataLoader

from gptlib import GPTModel, TokenWindows, TrainConfig, generate, train, window_loader
from gptlib.checkpoint import read_checkpoint
from gptlib.data import collate_windows
from gptlib.tokenizer import decode, encode
from gptlib.train import learning_rate

from conftest import assert_weights_close, tiny_config

SENTENCE = "Every effort moves you forward, one small step at a time."


def test_tiny_model_overfits_a_sentence():
    torch.manual_seed(0)
    ids = encode(SENTENCE)
    model = GPTModel(tiny_config())
    loader = window_loader(ids, length=len(ids) - 1, batch_size=1)
    result = train(model, loader, cfg=TrainConfig(max_steps=80, lr=1e-2, eval_every=20, progress=False, device="cpu"))
    assert result.history["train_loss"][0] > 9 and result.history["train_loss"][-1] < 0.05
    assert decode(generate(model, ids[:3], len(ids) - 3, eos_id=None)) == decode(ids[3:])


def test_schedule_warms_up_then_decays():
    cfg = TrainConfig(lr=1.0, warmup_steps=10, min_lr_ratio=0.1)
    lrs = [learning_rate(s, 100, cfg) for s in range(100)]
    assert lrs[0] == pytest.approx(0.1) and lrs[9] == pytest.approx(1.0)
    assert all(a >= b for a, b in zip(lrs[10:], lrs[11:])) and lrs[-1] == pytest.approx(0.1, abs=1e-3)


def interrupt_at(stop_step):
    """An on_step callback that presses Ctrl-C once training reaches ``stop_step``."""
    def on_step(step, loss):
        if step == stop_step:
            raise KeyboardInterrupt
    return on_step


def _run(tmp_path, name, loader, resume=None, on_step=None):
    torch.manual_seed(0)
    model = GPTModel(tiny_config(drop_rate=0.2))
    cfg = TrainConfig(epochs=3, lr=3e-3, warmup_steps=2, eval_every=4, eval_batches=2, grad_accum=2,
                      checkpoint_path=str(tmp_path / name), progress=False, device="cpu")
    return model, train(model, loader, cfg=cfg, resume=resume, on_step=on_step)


def test_interrupted_then_resumed_run_matches_an_uninterrupted_one(tmp_path):
    text = " ".join(f"line {i} of a small corpus about cats and dogs." for i in range(60))
    loader = window_loader(encode(text), length=16, batch_size=4, seed=5)
    full_model, full = _run(tmp_path, "full.pth", loader)
    assert full.steps == (3 * len(loader) + 1) // 2

    _, cut = _run(tmp_path, "cut.pth", loader, on_step=interrupt_at(7))  # Ctrl-C after step 7
    assert cut.interrupted and cut.steps == 7
    resume = read_checkpoint(tmp_path / "cut.pth")
    assert resume.train_state["step"] == 7
    resumed_model, resumed = _run(tmp_path, "cut.pth", loader, resume=resume)
    assert resumed.steps == full.steps and not resumed.interrupted
    for (name, a), b in zip(full_model.state_dict().items(), resumed_model.state_dict().values()):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-6, msg=name)
    assert resumed.history["step"] == full.history["step"]


def test_gradient_accumulation_matches_a_bigger_batch():
    text = " ".join(f"sentence number {i} here." for i in range(100))
    ids = encode(text)
    results = []
    for batch_size, accum in ((8, 1), (4, 2)):
        torch.manual_seed(0)
        model = GPTModel(tiny_config())
        # a plain sequential loader, so both runs see the same windows at every step
        loader = DataLoader(TokenWindows(ids, 16), batch_size=batch_size, collate_fn=collate_windows)
        # fp32: the check is arithmetic (bf16 rounds the two batch shapes differently)
        train(model, loader, cfg=TrainConfig(max_steps=3, grad_accum=accum, grad_clip=None, progress=False,
                                             eval_every=10, eval_batches=1, device="cpu", precision="fp32"))
        results.append(model.tok_emb.weight.detach().clone())
    torch.testing.assert_close(results[0], results[1], rtol=1e-4, atol=1e-5)


def test_early_stopping_restores_the_best_weights():
    torch.manual_seed(0)
    train_ids, val_ids = encode("a b c d " * 50), encode("completely different words here " * 30)
    model = GPTModel(tiny_config())
    result = train(model, window_loader(train_ids, 16, 4), window_loader(val_ids, 16, 4, shuffle=False),
                   TrainConfig(max_steps=400, lr=1e-2, eval_every=5, patience=2, progress=False, device="cpu"))
    assert result.stopped_early and result.steps < 400
    from gptlib import evaluate_loss
    val = evaluate_loss(model, window_loader(val_ids, 16, 4, shuffle=False), max_batches=20)
    assert val == pytest.approx(result.best_val_loss, rel=1e-5)


def test_ctrl_c_inside_an_optimizer_step_is_held_until_the_step_is_counted(tmp_path):
    """Regression: an interrupt between the optimizer's parameter-group updates, or between the update and the
    step count, saved weights that matched no step, so the resumed run differed from an uninterrupted one."""
    import os
    import signal

    from gptlib.train import make_optimizer

    text = " ".join(f"line {i} of a small corpus about cats and dogs." for i in range(60))
    loader = window_loader(encode(text), length=16, batch_size=4, seed=5)

    def run(name, resume=None, optimizer=None):
        torch.manual_seed(0)
        model = GPTModel(tiny_config())
        cfg = TrainConfig(max_steps=10, lr=3e-3, eval_every=5, eval_batches=1,
                          checkpoint_path=str(tmp_path / name), progress=False, device="cpu")
        optimizer = optimizer(model, cfg) if optimizer else None
        return model, train(model, loader, cfg=cfg, resume=resume, optimizer=optimizer)

    def interrupting_optimizer(model, cfg):
        optimizer = make_optimizer(model, cfg)
        calls = []

        def ctrl_c_inside_the_step(opt, args, kwargs):  # runs inside optimizer.step(), after the update
            calls.append(1)
            if len(calls) == 4:
                os.kill(os.getpid(), signal.SIGINT)
        optimizer.register_step_post_hook(ctrl_c_inside_the_step)
        return optimizer

    full_model, _ = run("full.pth")
    _, cut = run("cut.pth", optimizer=interrupting_optimizer)
    assert cut.interrupted and cut.steps == 4  # the 4th step completed and was counted before stopping
    assert read_checkpoint(tmp_path / "cut.pth").train_state["step"] == 4
    resumed_model, resumed = run("cut.pth", resume=read_checkpoint(tmp_path / "cut.pth"))
    assert resumed.steps == 10
    for (name, a), b in zip(full_model.state_dict().items(), resumed_model.state_dict().values()):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-6, msg=name)


def test_micro_batches_take_the_same_step_as_the_whole_batch():
    """--micro-batch-size runs a batch a few rows at a time; the step must not change (an instruction batch, whose
    rows teach different numbers of tokens, so a plain mean of micro-batch means would differ)."""
    from gptlib import Example, instruction_loader
    examples = [Example(f"Repeat the word {i} times.", "", " ".join(["dog"] * (1 + i % 5))) for i in range(24)]
    loader = instruction_loader(examples, batch_size=6, max_length=64, seed=3)
    weights = []
    for micro_batch_size in (None, 2, 4):
        torch.manual_seed(0)
        model = GPTModel(tiny_config(context_length=64))
        train(model, loader, cfg=TrainConfig(max_steps=4, lr=3e-3, micro_batch_size=micro_batch_size, progress=False,
                                             eval_every=10, eval_batches=1, device="cpu", precision="fp32"))
        weights.append(model.state_dict())
    for other in weights[1:]:
        assert_weights_close(weights[0], other, rtol=1e-4)


def test_fp16_steps_whose_gradients_overflow_are_skipped_counted_and_resumed_exactly(tmp_path):
    """fp16 autocast with a gradient scaler (what Colab's T4 trains in) runs on the CPU too. A progress file is
    given a loss scale so large that the scaled gradients overflow: those steps must leave the weights alone, halve
    the scale until it fits, be counted, and a run stopped in the middle resumes to the same weights."""
    import shutil

    text = " ".join(f"line {i} of a small corpus about cats and dogs." for i in range(60))
    loader = window_loader(encode(text), length=16, batch_size=4, seed=5)

    def run(path, resume=None, stop_at=None):
        torch.manual_seed(0)
        model = GPTModel(tiny_config())
        weights = []

        def on_step(step, loss):
            weights.append(model.blocks[0].att.qkv.weight.detach().clone())
            if step == stop_at:
                raise KeyboardInterrupt
        cfg = TrainConfig(max_steps=24, lr=3e-3, eval_every=8, eval_batches=1, checkpoint_path=str(path),
                          progress=False, device="cpu", precision="fp16")
        return model, train(model, loader, cfg=cfg, resume=resume, on_step=on_step), weights

    _, first, _ = run(tmp_path / "start.pth", stop_at=2)
    assert first.precision == "fp16" and first.skipped_steps == 0
    saved = torch.load(tmp_path / "start.pth", weights_only=True)
    assert saved["train_state"]["grad_scaler"]["scale"] == 2.0**16  # GradScaler's first scale, kept for resuming
    saved["train_state"]["grad_scaler"]["scale"] = 2.0**24
    torch.save(saved, tmp_path / "start.pth")
    for name in ("full.pth", "cut.pth"):
        shutil.copy(tmp_path / "start.pth", tmp_path / name)

    full_model, full, weights = run(tmp_path / "full.pth", read_checkpoint(tmp_path / "full.pth"))
    skipped = full.skipped_steps
    assert 3 <= skipped < 20 and full.steps == 24
    start = read_checkpoint(tmp_path / "start.pth").model_state["blocks.0.att.qkv.weight"]
    for w in weights[:skipped]:  # the overflowing steps come first and change nothing
        assert torch.equal(w, start)
    assert not torch.equal(weights[skipped], start)  # the first step whose gradients fit
    assert torch.load(tmp_path / "full.pth", weights_only=True)["train_state"]["skipped_steps"] == skipped

    _, cut, _ = run(tmp_path / "cut.pth", read_checkpoint(tmp_path / "cut.pth"), stop_at=2 + skipped // 2)
    assert cut.interrupted
    state = torch.load(tmp_path / "cut.pth", weights_only=True)["train_state"]
    assert state["grad_scaler"]["scale"] == 2.0 ** (24 - skipped // 2)  # halved once per skipped step
    resumed_model, resumed, _ = run(tmp_path / "cut.pth", read_checkpoint(tmp_path / "cut.pth"))
    assert resumed.skipped_steps == skipped
    for (name, a), b in zip(full_model.state_dict().items(), resumed_model.state_dict().values()):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-6, msg=name)


def test_compiled_training_gives_the_eager_losses_and_leaves_the_model_eager():
    text = " ".join(f"line {i} of a small corpus about cats and dogs." for i in range(60))
    loader = window_loader(encode(text), length=16, batch_size=4, seed=5)
    losses, models = [], []
    for compile in (False, True):
        torch.manual_seed(0)
        model = GPTModel(tiny_config(n_layers=2))
        result = train(model, loader, cfg=TrainConfig(max_steps=4, lr=3e-3, eval_every=2, eval_batches=1,
                                                      compile=compile, progress=False, device="cpu",
                                                      precision="fp32"))
        losses.append(result.step_losses + result.history["train_loss"])
        models.append(model)
    assert losses[1] == pytest.approx(losses[0], rel=1e-5)
    assert_weights_close(models[0].state_dict(), models[1].state_dict(), rtol=1e-5)
    assert all(block._compiled_call_impl is None for block in models[1].blocks)  # generation runs eager
