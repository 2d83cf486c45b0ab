"""LoRA: adapters train while the base stays frozen, fold into the base exactly, and only ever load on their own base."""

import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch

from gptlib import GPTModel, TrainConfig, instruction_loader, load_model, save_checkpoint, train
from gptlib.cli import main
from gptlib.instructions import load_jsonl
from gptlib.lora import LoRAConfig, LoRALinear, add_lora, adapter_state_dict, load_adapter, merge_lora

from conftest import ROOT, tiny_config

SARCASM = ROOT / "dataset" / "sarcasm" / "sarcasm_instruction_pairs.jsonl"


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    d = tmp_path_factory.mktemp("lora")
    torch.manual_seed(0)
    save_checkpoint(d / "base.pth", GPTModel(tiny_config(context_length=128)))
    lines = SARCASM.read_text(encoding="utf-8").splitlines()[:40]
    (d / "pairs.jsonl").write_text("\n".join(lines) + "\n", encoding="utf-8")
    return d


def adapted(workdir, **lora):
    model, _ = load_model(workdir / "base.pth")
    add_lora(model, LoRAConfig(**{"rank": 4, **lora}), base=workdir / "base.pth")
    return model


def trained_adapter(workdir, steps=6, **lora):
    """An adapted model after ``steps`` real training steps on the sarcasm pairs."""
    model = adapted(workdir, **lora)
    loader = instruction_loader(load_jsonl(workdir / "pairs.jsonl"), 4, 128, seed=0)
    train(model, loader, cfg=TrainConfig(max_steps=steps, lr=1e-2, warmup_steps=0, eval_every=steps, progress=False,
                                         precision="fp32"))
    return model.eval()


def test_a_new_adapter_changes_nothing_and_trains_only_itself(workdir):
    base, _ = load_model(workdir / "base.pth")
    ids = torch.randint(0, 50257, (2, 12))
    model = adapted(workdir, targets=("qkv", "out_proj", "fc", "proj"))
    with torch.no_grad():
        torch.testing.assert_close(model.eval()(ids), base.eval()(ids))  # B starts at zero
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(".lora_A" in n or ".lora_B" in n for n in trainable)
    assert sum(isinstance(m, LoRALinear) for m in model.modules()) == 4 * model.config.n_layers


def test_frozen_base_weights_do_not_change_while_training(workdir):
    before = {n: p.clone() for n, p in adapted(workdir).named_parameters()}
    model = trained_adapter(workdir)
    after = dict(model.named_parameters())
    for name, tensor in before.items():
        if ".lora_" in name:
            continue
        assert torch.equal(after[name], tensor), f"{name} changed"
    assert not torch.equal(after["blocks.0.att.qkv.lora_B"], before["blocks.0.att.qkv.lora_B"])


def test_the_merged_checkpoint_gives_the_logits_of_base_plus_adapter(workdir, tmp_path):
    model = trained_adapter(workdir)
    ids = torch.randint(0, 50257, (2, 20))
    with torch.no_grad():
        unmerged = model(ids)
    save_checkpoint(tmp_path / "adapter.pth", model)
    raw = torch.load(tmp_path / "adapter.pth", weights_only=True)
    assert set(raw["adapter_state_dict"]) == set(adapter_state_dict(model)) and "model_state_dict" not in raw
    assert (tmp_path / "adapter.pth").stat().st_size < 0.05 * (workdir / "base.pth").stat().st_size

    fresh, _ = load_model(tmp_path / "adapter.pth")  # a fresh load: base by its recorded path, merged
    assert code_of(["merge", "--adapter", tmp_path / "adapter.pth", "--out", tmp_path / "merged.pth"]) == 0
    merged_file, _ = load_model(tmp_path / "merged.pth")
    with torch.no_grad():
        for other in (fresh.eval(), merged_file.eval(), merge_lora(model)):
            torch.testing.assert_close(other(ids), unmerged, atol=1e-5, rtol=1e-5)
    assert not any(isinstance(m, LoRALinear) for m in merged_file.modules())


@pytest.mark.parametrize("tied", [False, True])
def test_an_embedding_adapter_trains_only_itself_and_merges_to_the_same_logits(workdir, tmp_path, tied):
    """Target "emb": the token embedding gets an adapter, and a head tied to it reads the adapted matrix too, so the
    model before merging, the fresh load of its file and the merged checkpoint all agree."""
    base_path = workdir / "base.pth"
    if tied:
        torch.manual_seed(0)
        base_path = tmp_path / "tied.pth"
        save_checkpoint(base_path, GPTModel(tiny_config(context_length=128, tie_weights=True)))
    model, _ = load_model(base_path)
    before = {n: p.clone() for n, p in model.named_parameters()}
    add_lora(model, LoRAConfig(rank=4, targets=("qkv", "emb"), emb_alpha=2), base=base_path)
    loader = instruction_loader(load_jsonl(workdir / "pairs.jsonl"), 4, 128, seed=0)
    train(model, loader, cfg=TrainConfig(max_steps=4, lr=1e-2, warmup_steps=0, eval_every=4, progress=False,
                                         precision="fp32"))
    model.eval()
    assert torch.equal(model.tok_emb.base.weight, before["tok_emb.weight"])
    assert not model.tok_emb.lora_A.eq(0).all()  # A starts at zero; training moved it
    ids = torch.randint(0, 50257, (2, 20))
    with torch.no_grad():
        unmerged = model(ids)
        head = before["tok_emb.weight" if tied else "out_head.weight"]  # a tied head is listed once, as tok_emb
        plain_head = torch.nn.functional.linear(model.hidden_states(ids), head)
    assert (unmerged - plain_head).abs().max() > 1e-3 if tied else torch.allclose(unmerged, plain_head, atol=1e-5)

    save_checkpoint(tmp_path / "adapter.pth", model)
    assert code_of(["merge", "--adapter", tmp_path / "adapter.pth", "--out", tmp_path / "merged.pth"]) == 0
    fresh, merged_file = load_model(tmp_path / "adapter.pth")[0], load_model(tmp_path / "merged.pth")[0]
    with torch.no_grad():
        for other in (fresh.eval(), merged_file.eval(), merge_lora(model)):
            torch.testing.assert_close(other(ids), unmerged, atol=1e-5, rtol=1e-5)
    assert (merged_file.out_head.weight is merged_file.tok_emb.weight) == tied


def code_of(argv):
    return main([str(a) for a in argv])


def test_an_adapter_refuses_another_base(workdir, tmp_path, capsys):
    model = trained_adapter(workdir, steps=2)
    save_checkpoint(tmp_path / "adapter.pth", model)
    torch.manual_seed(1)
    save_checkpoint(tmp_path / "other.pth", GPTModel(tiny_config(context_length=128)))
    with pytest.raises(ValueError, match="sha256"):
        load_adapter(tmp_path / "adapter.pth", base=tmp_path / "other.pth")
    code = code_of(["merge", "--adapter", tmp_path / "adapter.pth", "--base", tmp_path / "other.pth",
                    "--out", tmp_path / "merged.pth"])
    err = capsys.readouterr().err
    assert code == 2 and err.startswith("error:") and "sha256" in err and "Traceback" not in err
    assert not (tmp_path / "merged.pth").exists()

    moved = tmp_path / "adapter_of_a_missing_base.pth"
    raw = torch.load(tmp_path / "adapter.pth", weights_only=True)
    raw["base"]["path"] = str(tmp_path / "gone.pth")
    torch.save(raw, moved)
    assert code_of(["generate", "--checkpoint", moved, "hello", "--max-new-tokens", "2"]) == 2
    assert "does not exist" in capsys.readouterr().err
    assert code_of(["merge", "--adapter", workdir / "base.pth", "--out", tmp_path / "m.pth"]) == 2
    assert "not a LoRA adapter" in capsys.readouterr().err


def test_finetune_with_lora_end_to_end(workdir, capsys):
    out = workdir / "cli" / "lora.pth"
    out.parent.mkdir(exist_ok=True)
    code = code_of(["finetune", "--checkpoint", workdir / "base.pth", "--data", workdir / "pairs.jsonl", "--out", out,
                    "--max-steps", "6", "--eval-every", "3", "--lr", "1e-2", "--lora-rank", "4",
                    "--lora-targets", "qkv,fc", "--quiet"])
    err = capsys.readouterr().err
    assert code == 0, err
    assert "LoRA rank 4, alpha 8 on qkv, fc" in err
    metrics = json.loads(out.with_suffix(".metrics.json").read_text())
    assert metrics["lora"]["targets"] == ["qkv", "fc"] and metrics["test_loss_after"] < metrics["test_loss_before"]
    d = tiny_config().emb_dim  # rank x (in + out) per adapted layer, in each of the 2 blocks
    assert metrics["trainable_parameters"] == 2 * 4 * ((d + 3 * d) + (d + 4 * d))
    for argv in (["generate", "--checkpoint", out, "--instruction", "Hi?", "--max-new-tokens", "4"],
                 ["eval", "--checkpoint", out, "--data", workdir / "pairs.jsonl", "--limit", "2",
                  "--max-new-tokens", "3", "--json", "--quiet"]):
        assert code_of(argv) == 0, capsys.readouterr().err


def test_an_adapter_on_a_from_scratch_base_needs_no_n_heads_after_training(workdir, tmp_path, capsys):
    """An "LLMs from scratch" file has no config, so finetune takes --n-heads; the adapter records it for later."""
    from test_cli import scratch_state
    base, _ = load_model(workdir / "base.pth")
    torch.save(scratch_state(base), tmp_path / "scratch.pth")
    heads = str(tiny_config().n_heads)
    out = tmp_path / "lora.pth"
    assert code_of(["finetune", "--checkpoint", tmp_path / "scratch.pth", "--n-heads", heads, "--data",
                    workdir / "pairs.jsonl", "--out", out, "--max-steps", "2", "--lora-rank", "2", "--quiet"]) == 0
    capsys.readouterr()
    ids = torch.tensor([[1, 2, 3, 4]])
    expected = load_model(out)[0].eval()(ids)
    for argv in (["generate", "--checkpoint", out, "hello", "--max-new-tokens", "3"],
                 ["generate", "--checkpoint", out, "--n-heads", heads, "hello", "--max-new-tokens", "3"],
                 ["merge", "--adapter", out, "--out", tmp_path / "merged.pth"]):
        assert code_of(argv) == 0, capsys.readouterr().err
    merged, _ = load_model(tmp_path / "merged.pth")
    torch.testing.assert_close(merged.eval()(ids), expected)
    capsys.readouterr()
    wrong = str(2 * tiny_config().n_heads)
    assert code_of(["generate", "--checkpoint", out, "--n-heads", wrong, "hello", "--max-new-tokens", "3"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error:") and f"{heads} attention heads" in err and "Traceback" not in err


def test_finetune_adapts_the_embedding_on_a_cosine_schedule(workdir, capsys):
    """Notebook 07's adapters from the command line: every block layer and the embedding, lr decaying on a cosine."""
    out = workdir / "cli" / "lora_emb.pth"
    out.parent.mkdir(exist_ok=True)
    code = code_of(["finetune", "--checkpoint", workdir / "base.pth", "--data", workdir / "pairs.jsonl", "--out", out,
                    "--max-steps", "6", "--eval-every", "2", "--lr", "1e-2", "--schedule", "cosine", "--lora-rank",
                    "4", "--lora-targets", "qkv,out_proj,fc,proj,emb", "--lora-emb-alpha", "2", "--quiet"])
    err = capsys.readouterr().err
    assert code == 0, err
    assert "alpha 8 (embedding 2) on qkv, out_proj, fc, proj, emb" in err
    metrics = json.loads(out.with_suffix(".metrics.json").read_text())
    config = tiny_config()
    d = config.emb_dim  # rank 4 x (in + out) for each adapted layer of the 2 blocks, and for the embedding
    blocks = 2 * 4 * ((d + 3 * d) + (d + d) + (d + 4 * d) + (4 * d + d))
    assert metrics["trainable_parameters"] == blocks + 4 * (config.vocab_size + d)
    assert metrics["lora"]["emb_alpha"] == 2 and metrics["options"]["schedule"] == "cosine"
    rates = metrics["history"]["lr"]
    assert len(rates) >= 3 and all(a > b for a, b in zip(rates, rates[1:]))


@pytest.mark.parametrize("argv, expected", [
    (["--lora-rank", "0"], "must be positive"),
    (["--lora-targets", "qkv,nonsense"], "unknown layer"),
    (["--lora-alpha", "4"], "need --lora-rank"),
    (["--lora-rank", "4", "--lora-dropout", "1.5"], "dropout must be in [0, 1)"),
    (["--lora-emb-alpha", "2"], "need --lora-rank"),
    (["--lora-rank", "4", "--lora-emb-alpha", "2"], "add emb to --lora-targets"),
])
def test_bad_lora_flags(workdir, capsys, argv, expected):
    out = workdir / "bad" / "x.pth"
    out.parent.mkdir(exist_ok=True)
    code = code_of(["finetune", "--checkpoint", workdir / "base.pth", "--data", workdir / "pairs.jsonl",
                    "--out", out, "--max-steps", "2", "--quiet", *argv])
    err = capsys.readouterr().err
    assert code == 2 and expected in err and "Traceback" not in err
    assert not out.exists()


ONE_THREAD = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}


def test_a_killed_lora_run_resumes_to_the_same_adapter(workdir):
    def args(out):
        return [sys.executable, "-m", "gptlib.cli", "finetune", "--checkpoint", workdir / "base.pth", "--data",
                workdir / "pairs.jsonl", "--out", out, "--max-steps", "60", "--save-every", "4", "--eval-every", "100",
                "--lr", "1e-2", "--lora-rank", "4", "--precision", "fp32", "--quiet"]
    crash = workdir / "crash"
    crash.mkdir(exist_ok=True)
    whole = subprocess.run(list(map(str, args(crash / "whole.pth"))), capture_output=True, text=True, env=ONE_THREAD)
    assert whole.returncode == 0, whole.stderr
    cut = crash / "cut.pth"
    progress = cut.with_name("cut.progress.pth")
    proc = subprocess.Popen(list(map(str, args(cut))), stderr=subprocess.PIPE, text=True, env=ONE_THREAD)
    while not progress.exists() and proc.poll() is None:
        time.sleep(0.02)
    os.kill(proc.pid, signal.SIGKILL)
    proc.communicate()
    if proc.returncode == 0:
        pytest.skip("the run finished before the signal arrived (machine very fast)")
    resumed = subprocess.run(list(map(str, args(cut))) + ["--resume"], capture_output=True, text=True, env=ONE_THREAD)
    assert resumed.returncode == 0, resumed.stderr
    ours, theirs = (torch.load(p, weights_only=True)["adapter_state_dict"] for p in (cut, crash / "whole.pth"))
    for name in theirs:
        torch.testing.assert_close(ours[name], theirs[name], atol=1e-6, rtol=0)


HF_NAMES = {"qkv": "attn.c_attn", "out_proj": "attn.c_proj", "fc": "mlp.c_fc", "proj": "mlp.c_proj"}


def test_lora_forward_equals_peft_on_the_exported_model(workdir):
    """Same adapter weights in gptlib and in peft (on the HF export of the base): the same logits."""
    peft = pytest.importorskip("peft")
    pytest.importorskip("transformers")
    from gptlib.hf import to_hf

    base, _ = load_model(workdir / "base.pth")
    hf_model = to_hf(base)
    model = trained_adapter(workdir, targets=("qkv", "out_proj", "fc", "proj", "emb"), emb_alpha=2)
    config = model.lora.config
    peft_model = peft.get_peft_model(hf_model, peft.LoraConfig(
        r=config.rank, lora_alpha=config.alpha, lora_dropout=0.0, fan_in_fan_out=True,  # GPT-2's Conv1D layers
        target_modules=["c_attn", "c_proj", "c_fc", "wte"], alpha_pattern={"wte": config.emb_alpha}))
    theirs = dict(peft_model.named_parameters())
    with torch.no_grad():
        for name, tensor in adapter_state_dict(model).items():  # blocks.0.att.qkv.lora_A, tok_emb.lora_A
            if name.startswith("tok_emb."):  # peft's embedding adapter: the same A (rank x vocab) and B (dim x rank)
                which = name.split(".")[-1].replace("lora_", "lora_embedding_")
                target = f"base_model.model.transformer.wte.{which}.default"
            else:
                _, block, parent, layer, which = name.split(".")
                target = f"base_model.model.transformer.h.{block}.{HF_NAMES[layer]}.{which}.default.weight"
            assert theirs[target].shape == tensor.shape, target
            theirs[target].copy_(tensor)
    ids = torch.randint(0, 50257, (2, 24))
    with torch.no_grad():
        torch.testing.assert_close(peft_model.eval()(ids).logits, model(ids), atol=1e-5, rtol=1e-4)
