"""Every speed path gives the same numbers as the plain one (no timing here: see benchmarks/)."""

import copy
import importlib.util
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from gptlib import GPTModel, TrainConfig, generate
from gptlib.generate import SamplingSettings
from gptlib.model import IGNORE_INDEX, chunked_head_loss
from gptlib.device import fast_bf16
from gptlib.train import _autocast, make_optimizer, resolve_precision

from conftest import tiny_config

ROOT = Path(__file__).resolve().parents[1]


def _batch(seed=0, b=3, t=20, vocab=50257, masked=True):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, vocab, (b, t), generator=g)
    labels = torch.randint(0, vocab, (b, t), generator=g)
    if masked:
        labels[:, :7] = IGNORE_INDEX   # a prompt
        labels[1, 15:] = IGNORE_INDEX  # padding
    return ids, labels


def _plain_loss(model, ids, labels):
    """The textbook loss: full logits everywhere, then cross-entropy ignoring -100."""
    logits = model(ids)
    return F.cross_entropy(logits.flatten(0, 1).float(), labels.flatten(), ignore_index=IGNORE_INDEX)


def _assert_same_loss_and_gradients_as_plain(model, ids, labels):
    """model.loss against _plain_loss on a copy of the model: the same value and the same gradients."""
    twin = copy.deepcopy(model)
    ours = model.loss(ids, labels)
    ours.backward()
    ref = _plain_loss(twin, ids, labels)
    ref.backward()
    assert ours.item() == pytest.approx(ref.item(), rel=1e-5)
    for (name, p), q in zip(model.named_parameters(), twin.parameters()):
        assert torch.allclose(p.grad, q.grad, atol=1e-6), name


@pytest.mark.parametrize("row_chunk, vocab_chunk", [(1, 1), (5, 7), (64, 32), (10_000, 10_000), (16, 100)])
def test_chunked_head_loss_matches_plain_cross_entropy_and_its_gradients(row_chunk, vocab_chunk):
    torch.manual_seed(0)
    h = torch.randn(37, 16, requires_grad=True)
    w = torch.randn(101, 16, requires_grad=True)
    y = torch.randint(0, 101, (37,))
    plain = F.cross_entropy(h @ w.t(), y)
    plain.backward()
    gh, gw = h.grad.clone(), w.grad.clone()
    h.grad = w.grad = None
    fused = chunked_head_loss(h, w, y, row_chunk, vocab_chunk)
    (2 * fused).backward()  # a scale after the loss must reach the gradients too
    assert fused.item() == pytest.approx(plain.item(), rel=1e-5)
    assert torch.allclose(h.grad, 2 * gh, atol=1e-5) and torch.allclose(w.grad, 2 * gw, atol=1e-5)


def test_chunked_head_loss_skips_the_weight_gradient_of_a_frozen_head():
    h = torch.randn(9, 8, requires_grad=True)
    w = torch.randn(30, 8)  # frozen: no gradient wanted
    chunked_head_loss(h, w, torch.randint(0, 30, (9,)), 4, 8).backward()
    assert h.grad is not None and w.grad is None


def test_chunked_head_loss_under_bf16_autocast_is_close_to_autocast_plain_loss():
    """Under autocast its matmuls run in bf16 like autocast's LM head; softmax and sums stay fp32."""
    torch.manual_seed(0)
    h = torch.randn(300, 64, requires_grad=True)
    w = (0.1 * torch.randn(5000, 64)).requires_grad_()
    y = torch.randint(0, 5000, (300,))
    exact = F.cross_entropy(h @ w.t(), y)
    exact.backward()
    gh, gw = h.grad.clone(), w.grad.clone()
    h.grad = w.grad = None
    with torch.autocast("cpu", dtype=torch.bfloat16):
        fused = chunked_head_loss(h, w, y, 128, 1000)
    fused.backward()
    assert fused.dtype == torch.float32 and h.grad.dtype == w.grad.dtype == torch.float32
    assert fused.item() == pytest.approx(exact.item(), rel=1e-2)
    assert (h.grad - gh).norm() / gh.norm() < 2e-2 and (w.grad - gw).norm() / gw.norm() < 2e-2


@pytest.mark.parametrize("tie_weights", [False, True])
@pytest.mark.parametrize("masked", [False, True])
def test_model_loss_equals_full_logits_loss_with_same_gradients(monkeypatch, tie_weights, masked):
    """GPTModel.loss (labelled rows only, chunked head and loss) against full logits everywhere."""
    import gptlib.model as model_module

    monkeypatch.setattr(model_module, "LOSS_ROW_CHUNK", 8)  # several row chunks even on a small batch
    torch.manual_seed(0)
    model = GPTModel(tiny_config(tie_weights=tie_weights))
    ids, labels = _batch(masked=masked)
    _assert_same_loss_and_gradients_as_plain(model, ids, labels)


def test_loss_without_gradients_uses_no_fused_backward_work():
    torch.manual_seed(0)
    model = GPTModel(tiny_config())
    ids, labels = _batch()
    with torch.no_grad():
        assert model.loss(ids, labels).item() == pytest.approx(_plain_loss(model, ids, labels).item(), rel=1e-5)


@pytest.mark.parametrize("precision", ["auto", "bf16", "fp32"])
def test_autocast_follows_the_precision_and_auto_follows_the_hardware(precision):
    cpu = torch.device("cpu")
    expected = {"bf16": "bf16", "fp32": "fp32", "auto": "bf16" if fast_bf16(cpu) else "fp32"}[precision]
    assert resolve_precision(cpu, precision) == expected
    with _autocast(cpu, precision):
        assert torch.is_autocast_enabled("cpu") == (expected == "bf16")
    assert not torch.is_autocast_enabled("cpu")


def test_fast_bf16_matches_what_the_cpu_reports():
    flags = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").exists() else None
    if flags is None or not hasattr(torch.cpu, "_is_avx512_bf16_supported"):
        pytest.skip("no /proc/cpuinfo or an older torch: nothing to compare with")
    native = "avx512_bf16" in flags or "amx_tile" in flags
    assert fast_bf16(torch.device("cpu")) == native
    assert not fast_bf16(torch.device("meta"))


def test_bf16_loss_is_close_to_fp32():
    torch.manual_seed(0)
    model = GPTModel(tiny_config())
    ids, labels = _batch()
    with _autocast(torch.device("cpu"), "bf16"):
        low = model.loss(ids, labels)
    low.backward()
    assert low.item() == pytest.approx(model.loss(ids, labels).item(), rel=2e-2)


def test_optimizer_speed_path_gives_the_same_steps_as_the_plain_loop():
    torch.manual_seed(0)
    model = GPTModel(tiny_config())
    twin = copy.deepcopy(model)
    cfg = TrainConfig(lr=1e-3, progress=False)
    fast = make_optimizer(model, cfg)
    plain = make_optimizer(twin, cfg)
    for group in plain.param_groups:
        group["foreach"], group["fused"] = False, None  # the one-parameter-at-a-time reference loop
    ids, labels = _batch()
    for _ in range(3):
        for m, opt in ((model, fast), (twin, plain)):
            m.loss(ids, labels).backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
    for (name, p), q in zip(model.named_parameters(), twin.parameters()):
        assert torch.allclose(p, q, atol=1e-6), name


@pytest.mark.parametrize("settings", [SamplingSettings(), SamplingSettings(repetition_penalty=1.3),
                                      SamplingSettings(temperature=0.9, top_k=20)])
def test_cached_and_uncached_generation_are_identical(tiny_model, settings):
    prompt = [5, 17, 301, 42]
    n = 40  # beyond the context length of 32: the cache refills
    cached = generate(tiny_model, prompt, n, settings, eos_id=None, seed=3)
    uncached = generate(tiny_model, prompt, n, settings, eos_id=None, use_cache=False, seed=3)
    assert cached == uncached and len(cached) == n


def test_generation_leaves_no_autograd_state_and_restores_training_mode(tiny_model):
    tiny_model.train()
    generate(tiny_model, [1, 2, 3], 5, eos_id=None)
    assert tiny_model.training
    loss = tiny_model.loss(*_batch(t=10, masked=False))
    loss.backward()  # the model still trains after generating (no inference tensors leaked into it)


@pytest.mark.slow
def test_benchmark_runs_quick_mode_end_to_end():
    if importlib.util.find_spec("transformers") is None:
        pytest.skip("transformers not installed (pip install 'gptlib[hf]')")
    out = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "bench_vs_hf.py"), "--quick"],
                         capture_output=True, text=True, timeout=1800, cwd=ROOT)  # a guard against a hang, not a speed check
    assert out.returncode == 0, out.stderr[-2000:]
    assert "greedy tokens identical" in out.stdout
    for row in ("fine-tuning step", "pretraining step", "greedy generation", "peak memory"):
        assert row in out.stdout


def test_decode_benchmark_runs_and_fp32_variants_agree():
    out = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "bench_decode.py"), "--config", "tiny",
                          "--tokens", "8", "--repeats", "1", "--no-compile"],
                         capture_output=True, text=True, timeout=1800, cwd=ROOT)  # a guard against a hang only
    assert out.returncode == 0, out.stderr[-2000:]
    one_thread = next(line for line in out.stdout.splitlines() if line.startswith("| fp32, eager, 1 thread"))
    assert one_thread.endswith("| 8/8 |")  # fewer threads must not change a greedy token
    assert "LM head matrix-vector product, bfloat16" in out.stdout


def test_compare_vocab_refuses_a_vocabulary_with_a_base_checkpoint(tmp_path):
    out = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "compare_vocab.py"), "--vocab", "4096",
                          "--base", str(tmp_path / "any.pth")], capture_output=True, text=True, timeout=1800, cwd=ROOT)
    assert out.returncode == 2
    assert "--vocab and --base do not go together" in out.stderr


def _greedy_by_full_forward(model, prompt, n):
    ids = list(prompt)
    with torch.no_grad():
        for _ in range(n):
            ids.append(int(model(torch.tensor([ids]))[0, -1].argmax()))
    return ids[len(prompt):]


def _shared_prefix_batch(prefix=12, b=4, t=20, vocab=50257):
    """Rows that start with the same ``prefix`` tokens (an instruction batch's prompt header), right-padded."""
    ids, labels = _batch(b=b, t=t, vocab=vocab)
    ids[:, :prefix] = ids[0, :prefix]
    ids[2, 16:] = 50256                       # a shorter row: right padding
    labels[2, 15:] = IGNORE_INDEX
    return ids, labels


@pytest.mark.parametrize("labels_in_prefix", [False, True])
def test_shared_prefix_is_computed_once_with_the_same_loss_and_gradients(labels_in_prefix):
    from gptlib.model import shared_prefix_length

    torch.manual_seed(0)
    model = GPTModel(tiny_config()).train()    # drop_rate 0: the shared path is exact, so it is used
    ids, labels = _shared_prefix_batch()
    if labels_in_prefix:
        labels[:, 3] = ids[:, 4]              # a label inside the shared part must be graded in every row
    assert shared_prefix_length(ids) == 12
    _assert_same_loss_and_gradients_as_plain(model, ids, labels)


def test_shared_prefix_is_not_used_while_dropout_runs():
    """With dropout every row needs its own masks: the loss equals the plain path's under the same random state."""
    torch.manual_seed(0)
    model = GPTModel(tiny_config(drop_rate=0.5)).train()
    ids, labels = _shared_prefix_batch()
    torch.manual_seed(1)
    ours = model.loss(ids, labels)
    torch.manual_seed(1)
    assert ours.item() == pytest.approx(_plain_loss(model, ids, labels).item(), rel=1e-5)


def test_shared_prefix_length_leaves_a_token_per_row():
    from gptlib.model import shared_prefix_length

    ids = torch.tensor([[5, 6, 7], [5, 6, 7]])
    assert shared_prefix_length(ids) == 2
    assert shared_prefix_length(torch.tensor([[5, 6], [4, 6]])) == 0


def test_chunked_head_loss_under_fp16_autocast_keeps_the_small_gradients():
    """fp16 (what a T4 trains in) has too little range for (softmax - one_hot) / rows: with thousands of labelled
    rows and a large vocabulary most of it fell below fp16's smallest numbers, and the gradients lost 2-5%."""
    torch.manual_seed(0)
    n, d, vocab = 4096, 16, 16384
    h = torch.randn(n, d, requires_grad=True)
    w = (torch.randn(vocab, d) * 0.05).requires_grad_()
    y = torch.randint(0, vocab, (n,))
    F.cross_entropy(h @ w.t(), y).backward()
    expected = w.grad.clone(), h.grad.clone()
    w.grad = h.grad = None
    with torch.autocast("cpu", dtype=torch.float16):
        loss = chunked_head_loss(h, w, y)
    (loss * 1024).backward()  # a loss scale, as the gradient scaler applies
    for got, want in zip((w.grad / 1024, h.grad / 1024), expected):
        assert float((got - want).norm() / want.norm()) < 2e-3
