import pytest
import torch

from gptlib import CheckpointError, GPTModel, load_model, read_checkpoint, save_checkpoint
from gptlib.train import TrainConfig, make_optimizer

from conftest import tiny_config


def test_llms_from_scratch_checkpoint_reproduces_reference_logits(fixture_dir):
    model, ckpt = load_model(fixture_dir / "model_and_optimizer_tiny.pth", n_heads=2)
    reference = torch.load(fixture_dir / "reference_logits.pt", weights_only=True)
    assert ckpt.source_format == "llms-from-scratch"
    assert {k: getattr(ckpt.config, k) for k in reference["config"]} == reference["config"]
    with torch.no_grad():
        logits = model.eval()(reference["input_ids"])
    torch.testing.assert_close(logits, reference["logits"], rtol=1e-5, atol=1e-5)


def test_its_optimizer_state_loads_into_adamw_over_gptlib_model(fixture_dir):
    path = fixture_dir / "model_and_optimizer_tiny.pth"
    model, ckpt = load_model(path, n_heads=2)
    optimizer = make_optimizer(model, TrainConfig(lr=5e-5), ckpt.optimizer_state)
    raw = torch.load(path, weights_only=True)["optimizer_state_dict"]["state"]
    # their parameter 2, 3, 4 are W_query, W_key, W_value of block 0: gptlib holds them as one qkv tensor
    qkv = model.blocks[0].att.qkv.weight
    expected = torch.cat([raw[2]["exp_avg"], raw[3]["exp_avg"], raw[4]["exp_avg"]])
    assert torch.equal(optimizer.state[qkv]["exp_avg"], expected)
    assert torch.equal(optimizer.state[model.tok_emb.weight]["exp_avg_sq"], raw[0]["exp_avg_sq"])
    assert float(optimizer.state[qkv]["step"]) == 2.0
    assert all(state["exp_avg"].shape == p.shape for p, state in optimizer.state.items())
    model.train()
    loss = model.loss(torch.randint(0, 50257, (1, 8)), torch.randint(0, 50257, (1, 8)))
    loss.backward()
    optimizer.step()  # the restored state is usable


def test_missing_n_heads_is_a_clear_error(fixture_dir):
    with pytest.raises(CheckpointError, match="--n-heads"):
        read_checkpoint(fixture_dir / "model_and_optimizer_tiny.pth")
    with pytest.raises(CheckpointError, match="does not divide"):
        read_checkpoint(fixture_dir / "model_and_optimizer_tiny.pth", n_heads=3)


def test_gptlib_round_trip_with_optimizer_and_train_state(tmp_path):
    torch.manual_seed(0)
    model = GPTModel(tiny_config(tie_weights=True))
    optimizer = make_optimizer(model, TrainConfig())
    model.loss(torch.randint(0, 50257, (1, 8)), torch.randint(0, 50257, (1, 8))).backward()
    optimizer.step()
    save_checkpoint(tmp_path / "m.pth", model, optimizer, {"step": 1})
    loaded, ckpt = load_model(tmp_path / "m.pth")
    assert ckpt.source_format == "gptlib" and ckpt.train_state == {"step": 1}
    assert loaded.config == model.config and loaded.out_head.weight is loaded.tok_emb.weight
    for (name, a), b in zip(model.state_dict().items(), loaded.state_dict().values()):
        assert torch.equal(a, b), name
    make_optimizer(loaded, TrainConfig(), ckpt.optimizer_state)
    assert not list(tmp_path.glob(".*tmp"))  # the atomic write left no temporary file


def test_bare_state_dict_and_compile_prefix(tmp_path):
    model = GPTModel(tiny_config())
    torch.save({f"_orig_mod.{k}": v for k, v in model.state_dict().items()}, tmp_path / "bare.pth")
    loaded, ckpt = load_model(tmp_path / "bare.pth", n_heads=2)
    assert ckpt.source_format == "state_dict" and ckpt.optimizer_state is None
    assert torch.equal(loaded.blocks[1].ff.fc.weight, model.blocks[1].ff.fc.weight)


def test_config_and_checkpoint_disagreeing_names_the_tensor(tmp_path):
    save_checkpoint(tmp_path / "m.pth", GPTModel(tiny_config()))
    with pytest.raises(CheckpointError, match=r"'tok_emb.weight' has shape \(50257, 32\).*\(50257, 64\)"):
        load_model(tmp_path / "m.pth", config=tiny_config(emb_dim=64))


@pytest.mark.parametrize("content, message", [
    (b"", "not a readable PyTorch checkpoint"),
    (b"this is plain text", "not a readable PyTorch checkpoint"),
])
def test_unreadable_files(tmp_path, content, message):
    (tmp_path / "bad.pth").write_bytes(content)
    with pytest.raises(CheckpointError, match=message):
        read_checkpoint(tmp_path / "bad.pth")


def test_truncated_and_pickled_code_checkpoints(tmp_path):
    save_checkpoint(tmp_path / "m.pth", GPTModel(tiny_config()))
    data = (tmp_path / "m.pth").read_bytes()
    (tmp_path / "cut.pth").write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="truncated"):
        read_checkpoint(tmp_path / "cut.pth")
    torch.save({"model_state_dict": {}, "hook": print}, tmp_path / "code.pth")
    with pytest.raises(CheckpointError, match="weights_only"):
        read_checkpoint(tmp_path / "code.pth")


def test_other_architecture_is_named(tmp_path):
    torch.save({"transformer.h.0.attn.c_attn.weight": torch.zeros(2, 2)}, tmp_path / "hf.pth")
    with pytest.raises(CheckpointError, match="not a GPT checkpoint.*transformer.h.0"):
        read_checkpoint(tmp_path / "hf.pth")
