"""gptlib <-> Hugging Face transformers: same logits, same greedy tokens, same token ids, all offline."""

import os

os.environ["HF_HUB_OFFLINE"] = "1"  # before transformers and huggingface_hub read it: no test touches the network

import json
import sys

import pytest
import torch

transformers = pytest.importorskip("transformers")

from gptlib import GPTConfig, GPTModel, UserInputError, encode, generate, save_checkpoint
from gptlib.cli import main
from gptlib.hf import from_hf, load_pretrained, to_hf, vocab_and_merges

VARIED_TEXT = ("Hello, world! It's 2024: prices rose 3.5% to $1,234.56.\n\n\n"
               "    indented   code\tand\ttabs  \r\n"
               "Ünïcödé café naïve — “quotes” 日本語のテキスト 🤖🚀 emoji\u00a0nbsp\n"
               "<|endoftext|>A new document<|endoftext|>  trailing spaces   ")


def hf_tiny(tie: bool, seed: int = 0):
    torch.manual_seed(seed)
    config = transformers.GPT2Config(n_embd=32, n_layer=2, n_head=2, n_positions=64, vocab_size=50257,
                                     tie_word_embeddings=tie)
    return transformers.GPT2LMHeadModel(config).eval()


def gptlib_tiny(tie: bool, qkv_bias: bool = True, seed: int = 0) -> GPTModel:
    torch.manual_seed(seed)
    model = GPTModel(GPTConfig(vocab_size=50257, context_length=64, emb_dim=32, n_heads=2, n_layers=2,
                               drop_rate=0.0, qkv_bias=qkv_bias, tie_weights=tie))
    with torch.no_grad():  # non-zero biases and norms, so a mapping mistake cannot hide behind zeros and ones
        for name, p in model.named_parameters():
            if name.endswith("bias") or "norm" in name:
                p.add_(torch.randn_like(p) * 0.1)
    return model.eval()


def logits(model, ids):
    with torch.no_grad():
        out = model(ids)
    return getattr(out, "logits", out)


IDS = torch.tensor([encode("The quick brown fox jumps over the lazy dog, twice over.")])


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """gptlib models (tied and untied head, the latter without a qkv bias) and the folders to_hf wrote."""
    root = tmp_path_factory.mktemp("hf")
    out = {}
    for tie in (True, False):
        model = gptlib_tiny(tie, qkv_bias=tie)
        to_hf(model, root / f"tied-{tie}")
        out[tie] = (model, root / f"tied-{tie}")
    return out


# ---------------------------------------------------------------- HF -> gptlib

@pytest.mark.parametrize("tie", [True, False])
def test_from_hf_gives_the_same_logits(tie):
    hf = hf_tiny(tie)
    ours = from_hf(hf)
    assert ours.config.qkv_bias and ours.config.tie_weights == tie and ours.config.context_length == 64
    assert (ours.out_head.weight is ours.tok_emb.weight) == tie
    ids = torch.randint(0, 50257, (2, 40))
    torch.testing.assert_close(logits(ours, ids), logits(hf, ids), atol=1e-5, rtol=0)
    with torch.no_grad():  # a copy: changing ours leaves the caller's HF model alone
        ours.final_norm.weight.add_(1.0)
    assert not torch.equal(ours.final_norm.weight, hf.transformer.ln_f.weight)


@pytest.mark.parametrize("change, words", [
    (dict(activation_function="gelu"), "activation_function"),
    (dict(activation_function="relu"), "activation_function"),
    (dict(scale_attn_by_inverse_layer_idx=True), "scale_attn_by_inverse_layer_idx"),
    (dict(reorder_and_upcast_attn=True), "reorder_and_upcast_attn"),
    (dict(layer_norm_epsilon=1e-6), "layer_norm_epsilon"),
    (dict(add_cross_attention=True), "add_cross_attention"),
    (dict(n_inner=48), "n_inner"),
])
def test_unsupported_hf_configs_are_refused(change, words, tmp_path):
    config = transformers.GPT2Config(n_embd=32, n_layer=1, n_head=2, n_positions=16, vocab_size=50257, **change)
    with pytest.raises(UserInputError, match=words):
        from_hf(transformers.GPT2LMHeadModel(config))
    config.save_pretrained(tmp_path)  # a folder is refused from its config.json, before any weights are read
    with pytest.raises(UserInputError, match=words):
        from_hf(tmp_path)


def test_from_hf_folder_errors(tmp_path):
    with pytest.raises(UserInputError, match="no such folder"):
        from_hf(tmp_path / "missing")
    with pytest.raises(UserInputError, match="no config.json"):
        from_hf(tmp_path)
    with pytest.raises(UserInputError, match="GPT2LMHeadModel"):
        from_hf(torch.nn.Linear(2, 2))


# ---------------------------------------------------------------- gptlib -> HF

@pytest.mark.parametrize("tie", [True, False])
def test_to_hf_folder_loads_offline_with_the_same_logits(exported, tie):
    model, folder = exported[tie]
    names = {p.name for p in folder.iterdir()}
    assert {"config.json", "model.safetensors", "vocab.json", "merges.txt", "tokenizer_config.json",
            "special_tokens_map.json"} <= names
    assert not any(n.startswith(".") for n in names)
    config = json.loads((folder / "config.json").read_text())
    assert config["tie_word_embeddings"] == tie and config["eos_token_id"] == config["bos_token_id"] == 50256
    hf = transformers.GPT2LMHeadModel.from_pretrained(folder, local_files_only=True).eval()
    assert (hf.lm_head.weight is hf.transformer.wte.weight) == tie
    ids = torch.randint(0, 50257, (2, 40))
    torch.testing.assert_close(logits(hf, ids), logits(model, ids), atol=1e-5, rtol=0)
    back = from_hf(folder)  # and the whole way round
    torch.testing.assert_close(logits(back, ids), logits(model, ids), atol=1e-5, rtol=0)


def test_to_hf_in_memory_matches():
    model = gptlib_tiny(tie=True, qkv_bias=False)
    hf = to_hf(model)
    ids = torch.randint(0, 50257, (1, 64))  # the whole context
    torch.testing.assert_close(logits(hf, ids), logits(model, ids), atol=1e-5, rtol=0)


def test_greedy_generation_matches_transformers(tmp_path):
    model = gptlib_tiny(tie=False)
    prompt = encode("Once upon a time")
    first = generate(model, prompt, 2, eos_id=None)
    with torch.no_grad():  # make <|endoftext|> likely, so that "eos disabled" is really tested
        model.out_head.weight[50256] = 1.5 * model.out_head.weight[first[1]]
    ours = generate(model, prompt, 40, eos_id=None)
    to_hf(model, tmp_path / "m")
    hf = transformers.GPT2LMHeadModel.from_pretrained(tmp_path / "m", local_files_only=True).eval()
    ids = torch.tensor([prompt])
    out = hf.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=40, do_sample=False,
                      eos_token_id=None, pad_token_id=50256)
    assert out[0, len(prompt):].tolist() == ours
    assert 50256 in ours and len(ours) == 40


def test_pipeline_generates_text_offline(exported):
    _, folder = exported[True]
    pipe = transformers.pipeline("text-generation", model=str(folder), device="cpu")
    text = pipe("Hello there", max_new_tokens=5, do_sample=False)[0]["generated_text"]
    assert text.startswith("Hello there") and len(text) > len("Hello there")


def test_exported_tokenizer_gives_gptlib_ids(exported):
    _, folder = exported[False]
    expected = encode(VARIED_TEXT)
    assert 50256 in expected
    for cls in (transformers.GPT2TokenizerFast, transformers.AutoTokenizer):
        tokenizer = cls.from_pretrained(folder, local_files_only=True)
        assert tokenizer(VARIED_TEXT)["input_ids"] == expected
        assert tokenizer.decode(expected) == VARIED_TEXT
        assert tokenizer.eos_token_id == 50256
    # the slow-file route (vocab.json + merges.txt, no tokenizer.json) agrees as well
    (folder / "tokenizer.json").rename(folder.parent / "tokenizer.json.aside")
    try:
        tokenizer = transformers.GPT2TokenizerFast.from_pretrained(folder, local_files_only=True)
        assert tokenizer(VARIED_TEXT)["input_ids"] == expected
    finally:
        (folder.parent / "tokenizer.json.aside").rename(folder / "tokenizer.json")


def test_merges_are_gpt2s():
    vocab, merges = vocab_and_merges()
    assert len(vocab) == 50257 and len(merges) == 50000
    assert vocab["<|endoftext|>"] == 50256 and vocab["Ġthe"] == 262 and vocab["!"] == 0
    assert merges[:3] == [("Ġ", "t"), ("Ġ", "a"), ("h", "e")] and merges[-1] == ("Ġg", "azed")


def test_to_hf_writes_atomically_and_refuses_to_overwrite(tmp_path, monkeypatch):
    model = gptlib_tiny(tie=True)
    target = tmp_path / "out"
    target.mkdir()
    (target / "keep.txt").write_text("mine")
    with pytest.raises(UserInputError, match="not empty"):
        to_hf(model, target)
    assert (target / "keep.txt").read_text() == "mine"
    with pytest.raises(UserInputError, match="does not exist"):
        to_hf(model, tmp_path / "no" / "out")
    (tmp_path / "file").write_text("x")
    with pytest.raises(UserInputError, match="is a file"):
        to_hf(model, tmp_path / "file")

    import gptlib.hf as hf_module

    def broken(*args, **kwargs):
        raise OSError("disk full")
    monkeypatch.setattr(hf_module, "write_tokenizer_files", broken)
    with pytest.raises(OSError, match="disk full"):  # a failure half-way leaves the old folder and no debris
        to_hf(model, target, overwrite=True)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["file", "out"]
    assert [p.name for p in target.iterdir()] == ["keep.txt"]
    monkeypatch.undo()
    to_hf(model, target, overwrite=True)
    assert not (target / "keep.txt").exists() and (target / "model.safetensors").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["file", "out"]


def test_missing_transformers_gives_install_hint(monkeypatch):
    monkeypatch.setitem(sys.modules, "transformers", None)  # import transformers now raises ImportError
    with pytest.raises(UserInputError, match=r"pip install 'gptlib\[hf\]'"):
        to_hf(gptlib_tiny(tie=True))


# ---------------------------------------------------------------- OpenAI's weights, without the network

def test_load_pretrained_offline_fails_fast_and_says_where(tmp_path, monkeypatch):
    import huggingface_hub.constants
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(UserInputError) as info:  # offline: fails at once instead of retrying the network
        load_pretrained("gpt2", cache_dir=tmp_path)
    message = str(info.value)
    assert str(tmp_path / "gpt2") in message and "model.safetensors" in message and "from_hf" in message
    with pytest.raises(UserInputError, match="unknown pretrained model"):
        load_pretrained("gpt3", cache_dir=tmp_path)


def test_load_pretrained_download_failure_is_a_user_error(tmp_path, monkeypatch):
    import huggingface_hub
    import huggingface_hub.constants

    def no_network(*args, **kwargs):
        raise OSError("Name or service not known")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(huggingface_hub, "snapshot_download", no_network)
    with pytest.raises(UserInputError, match="could not download openai-community/gpt2-medium"):
        load_pretrained("gpt2-medium", cache_dir=tmp_path)


def test_load_pretrained_reads_files_placed_in_the_cache(exported, tmp_path, monkeypatch):
    import huggingface_hub.constants
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    model, folder = exported[True]
    (tmp_path / "gpt2").mkdir()
    for name in ("config.json", "model.safetensors"):
        (tmp_path / "gpt2" / name).write_bytes((folder / name).read_bytes())
    loaded = load_pretrained("gpt2", cache_dir=tmp_path)
    torch.testing.assert_close(logits(loaded, IDS), logits(model, IDS), atol=1e-5, rtol=0)


# ---------------------------------------------------------------- gptlib export

def test_cli_export(tmp_path, capsys):
    model = gptlib_tiny(tie=True)
    save_checkpoint(tmp_path / "m.pth", model)
    assert main(["export", "--checkpoint", str(tmp_path / "m.pth"), "--to-hf", str(tmp_path / "hf")]) == 0
    hf = transformers.GPT2LMHeadModel.from_pretrained(tmp_path / "hf", local_files_only=True).eval()
    torch.testing.assert_close(logits(hf, IDS), logits(model, IDS), atol=1e-5, rtol=0)
    assert "wrote" in capsys.readouterr().err

    # a bare state_dict needs --n-heads, as elsewhere in the CLI
    torch.save(model.state_dict(), tmp_path / "bare.pth")
    assert main(["export", "--checkpoint", str(tmp_path / "bare.pth"), "--n-heads", "2",
                 "--to-hf", str(tmp_path / "bare")]) == 0
    assert main(["export", "--checkpoint", str(tmp_path / "m.pth"), "--to-hf", str(tmp_path / "hf"),
                 "--overwrite"]) == 0


@pytest.mark.parametrize("case", ["missing checkpoint", "not empty", "no parent", "no heads"])
def test_cli_export_bad_inputs(case, tmp_path, capsys):
    model = gptlib_tiny(tie=True)
    save_checkpoint(tmp_path / "m.pth", model)
    torch.save(model.state_dict(), tmp_path / "bare.pth")
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "x").write_text("x")
    args = {"missing checkpoint": ["--checkpoint", str(tmp_path / "nope.pth"), "--to-hf", str(tmp_path / "o")],
            "not empty": ["--checkpoint", str(tmp_path / "m.pth"), "--to-hf", str(tmp_path / "full")],
            "no parent": ["--checkpoint", str(tmp_path / "m.pth"), "--to-hf", str(tmp_path / "a" / "b")],
            "no heads": ["--checkpoint", str(tmp_path / "bare.pth"), "--to-hf", str(tmp_path / "o")]}[case]
    capsys.readouterr()
    assert main(["export", *args]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and len(err.splitlines()) == 1, err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bare.pth", "full", "m.pth"]  # nothing written
    assert [p.name for p in (tmp_path / "full").iterdir()] == ["x"]
