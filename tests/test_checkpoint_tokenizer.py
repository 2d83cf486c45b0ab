"""Every checkpoint carries its tokenizer: pretrain -> finetune -> generate -> eval -> export keep and use it."""

import json
import subprocess
import sys

import pytest
import torch

from gptlib import GPT2, GPTModel, load_model, save_checkpoint, train_bpe
from gptlib.checkpoint import read_checkpoint
from gptlib.cli import main

from conftest import ROOT, tiny_config
from test_cli import scratch_state

SARCASM = ROOT / "dataset" / "sarcasm" / "sarcasm_instruction_pairs.jsonl"


def run(*argv) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "gptlib.cli", *map(str, argv)], capture_output=True, text=True)


@pytest.fixture(scope="module")
def chain(tmp_path_factory):
    """A tiny model pretrained with a 400-token BPE, then fine-tuned, through the command line."""
    d = tmp_path_factory.mktemp("chain")
    rows = [json.loads(line) for line in SARCASM.read_text(encoding="utf-8").splitlines()]
    (d / "text.txt").write_text("\n\n".join(r["response"] + "\n" + r["sincere"] for r in rows), encoding="utf-8")
    (d / "pairs.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows[:80]), encoding="utf-8")
    done = run("pretrain", "--data", d / "text.txt", "--vocab-size", 400, "--context-length", 192, "--emb-dim", 32,
               "--n-layers", 1, "--n-heads", 2, "--max-steps", 6, "--eval-every", 6,
               "--batch-size", 4, "--out", d / "base.pth", "--quiet")
    assert done.returncode == 0, done.stderr
    done = run("finetune", "--checkpoint", d / "base.pth", "--data", d / "pairs.jsonl", "--max-steps", 4,
               "--eval-every", 4, "--batch-size", 4, "--lr", "1e-3", "--out", d / "tuned.pth", "--quiet")
    assert done.returncode == 0, done.stderr
    return d


def test_pretrain_stores_the_trained_tokenizer_and_finetune_keeps_it(chain):
    base, tuned = read_checkpoint(chain / "base.pth"), read_checkpoint(chain / "tuned.pth")
    assert base.tokenizer.name == "bpe-400" and base.config.vocab_size == 400
    assert tuned.tokenizer == base.tokenizer
    metrics = json.loads((chain / "base.metrics.json").read_text())
    assert metrics["tokenizer"] == {"name": "bpe-400", "vocab_size": 400}


def test_generate_uses_the_checkpoints_tokenizer(chain):
    model, _ = load_model(chain / "tuned.pth")
    from gptlib import generate_text
    expected = generate_text(model.eval(), "Oh, great.", max_new_tokens=15)
    done = run("generate", "--checkpoint", chain / "tuned.pth", "--max-new-tokens", 15, "Oh, great.")
    assert done.returncode == 0, done.stderr
    assert done.stdout.rstrip("\n") == expected


def test_eval_and_validate_use_the_checkpoints_tokenizer(chain, capsys):
    assert main(["eval", "--checkpoint", str(chain / "tuned.pth"), "--data", str(chain / "pairs.jsonl"),
                 "--limit", "3", "--max-new-tokens", "5", "--json", "--quiet"]) == 0
    assert json.loads(capsys.readouterr().out)["examples"] == 3
    assert main(["validate", "--data", str(chain / "pairs.jsonl"), "--checkpoint", str(chain / "tuned.pth")]) == 0


def test_export_gives_transformers_the_same_ids_and_logits(chain, tmp_path):
    transformers = pytest.importorskip("transformers")
    assert main(["export", "--checkpoint", str(chain / "tuned.pth"), "--to-hf", str(tmp_path / "hf")]) == 0
    model, _ = load_model(chain / "tuned.pth")
    text = "Oh, wonderful. Another meeting that could have been an email.<|endoftext|>"
    hf_tokenizer = transformers.AutoTokenizer.from_pretrained(tmp_path / "hf", local_files_only=True)
    ids = hf_tokenizer(text)["input_ids"]
    assert ids == model.tokenizer.encode(text)
    assert hf_tokenizer.decode(ids) == text and hf_tokenizer.eos_token_id == model.tokenizer.eot_id
    hf_model = transformers.GPT2LMHeadModel.from_pretrained(tmp_path / "hf", local_files_only=True).eval()
    with torch.no_grad():
        ours = model.eval()(torch.tensor([ids]))
        theirs = hf_model(torch.tensor([ids])).logits
    torch.testing.assert_close(ours, theirs, atol=1e-5, rtol=1e-4)
    from gptlib.hf import from_hf
    assert from_hf(tmp_path / "hf").tokenizer == model.tokenizer  # and back


def test_tokenizer_command_writes_a_tokenizer_pretrain_can_use(chain, tmp_path, capsys):
    out = tmp_path / "tok.json"
    assert main(["tokenizer", "--data", str(chain / "text.txt"), str(SARCASM), "--vocab-size", "300",
                 "--out", str(out)]) == 0
    assert "tokens per character" in capsys.readouterr().err
    assert main(["tokenizer", "--data", str(chain / "text.txt"), "--vocab-size", "300", "--out", str(out)]) == 2
    assert "already exists" in capsys.readouterr().err
    done = run("pretrain", "--data", chain / "text.txt", "--tokenizer", out, "--context-length", 32, "--emb-dim", 16,
               "--n-layers", 1, "--n-heads", 2, "--max-steps", 2, "--eval-every", 2,
               "--batch-size", 2, "--out", tmp_path / "m.pth", "--quiet")
    assert done.returncode == 0, done.stderr
    assert read_checkpoint(tmp_path / "m.pth").config.vocab_size == 300


def test_older_files_mean_gpt2(tmp_path):
    torch.manual_seed(0)
    model = GPTModel(tiny_config())
    torch.save(model.state_dict(), tmp_path / "bare.pth")
    assert read_checkpoint(tmp_path / "bare.pth", n_heads=2).tokenizer is GPT2
    save_checkpoint(tmp_path / "own.pth", model)
    assert read_checkpoint(tmp_path / "own.pth").tokenizer is GPT2


@pytest.mark.parametrize("form", ["scratch", "gptlib-with-bpe"])
def test_an_embedding_smaller_than_the_tokenizer_is_an_error(form, tmp_path, capsys):
    torch.manual_seed(0)
    path = tmp_path / "small.pth"
    if form == "scratch":  # an "LLMs from scratch" file with 1,000 rows: GPT-2 ids would have no row
        model = GPTModel(tiny_config(vocab_size=1000))
        torch.save({"model_state_dict": scratch_state(model)}, path)
        argv = ["generate", "--checkpoint", str(path), "--n-heads", "2", "hello"]
    else:  # a gptlib file whose stored tokenizer is larger than its embedding
        tokenizer = train_bpe([SARCASM.read_text(encoding="utf-8")], vocab_size=500)
        model = GPTModel(tiny_config(vocab_size=500), tokenizer=tokenizer)
        save_checkpoint(path, model)
        payload = torch.load(path, weights_only=True)
        payload["model_state_dict"]["tok_emb.weight"] = payload["model_state_dict"]["tok_emb.weight"][:300]
        payload["model_state_dict"]["out_head.weight"] = payload["model_state_dict"]["tok_emb.weight"]
        payload["config"]["vocab_size"] = 300
        torch.save(payload, path)
        argv = ["generate", "--checkpoint", str(path), "hello"]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("error:") and "embedding" in err and "rows" in err and err.count("\n") == 1


def test_a_model_refuses_a_tokenizer_larger_than_its_embedding():
    with pytest.raises(ValueError, match="only 300 rows"):
        GPTModel(tiny_config(vocab_size=300), tokenizer=GPT2)


def test_export_keeps_a_digit_splitting_tokenizer(tmp_path):
    """The workbook's tokenizer cuts numbers into digits: transformers must load that pre-tokenizer too."""
    transformers = pytest.importorskip("transformers")
    text = SARCASM.read_text(encoding="utf-8") + "\n".join(f"What is {a} plus 12? {a + 12}" for a in range(200))
    tokenizer = train_bpe([text], vocab_size=500, split_digits=True)
    model = GPTModel(tiny_config(vocab_size=500), tokenizer=tokenizer)
    save_checkpoint(tmp_path / "m.pth", model)
    assert main(["export", "--checkpoint", str(tmp_path / "m.pth"), "--to-hf", str(tmp_path / "hf")]) == 0
    sample = "What is 57 plus 168?\n\n### Response:\n225 ÿ€<|endoftext|>"
    hf_tokenizer = transformers.AutoTokenizer.from_pretrained(tmp_path / "hf", local_files_only=True)
    assert hf_tokenizer(sample)["input_ids"] == tokenizer.encode(sample)
    assert [tokenizer.decode([i]) for i in tokenizer.encode("225")] == ["2", "2", "5"]


def test_tokenizer_command_can_split_digits(tmp_path):
    from gptlib import BPETokenizer
    text = tmp_path / "sums.txt"
    text.write_text("\n".join(f"What is {a} plus {a}? {2 * a}" for a in range(500)), encoding="utf-8")
    for flag, name in (([], "plain.json"), (["--split-digits"], "digits.json")):
        assert main(["tokenizer", "--data", str(text), "--vocab-size", "300", "--out", str(tmp_path / name), *flag]) == 0
    plain, digits = BPETokenizer.load(tmp_path / "plain.json"), BPETokenizer.load(tmp_path / "digits.json")
    assert [digits.decode([i]) for i in digits.encode(" 468")] == [" ", "4", "6", "8"]
    assert len(plain.encode(" 468")) < 4  # without the flag, frequent digit pairs merge
