"""The notebooks' USE_GPT2 switch, run offline: a GPT-2-architecture model with random weights saved by transformers
stands in for OpenAI's download (a small one for the notebooks' code path, one at the real 124M shape for a
training step), and without the weights the switch says so in one line and the notebook carries on."""

import os

os.environ["HF_HUB_OFFLINE"] = "1"  # before transformers and huggingface_hub read it: no test touches the network

import json
from pathlib import Path

import pytest
import torch

transformers = pytest.importorskip("transformers")
nbformat = pytest.importorskip("nbformat")
nbclient = pytest.importorskip("nbclient")

from gptlib import TrainConfig, instruction_loader, load_jsonl, train  # noqa: E402
from gptlib.hf import load_pretrained  # noqa: E402
from gptlib.workbook import project_root  # noqa: E402

from conftest import ROOT  # noqa: E402

NOTEBOOKS = ROOT / "notebooks"
PLAYS = ROOT / "dataset" / "pretraining" / "shakespeare_train.txt"


def save_random_gpt2(folder: Path, **sizes) -> Path:
    """A GPT2LMHeadModel with random weights, saved as OpenAI's is on the Hub (config.json, model.safetensors)."""
    torch.manual_seed(0)
    transformers.GPT2LMHeadModel(transformers.GPT2Config(**sizes)).save_pretrained(folder)
    return folder


def test_load_pretrained_reads_a_local_folder_and_never_downloads(tmp_path):
    folder = save_random_gpt2(tmp_path / "my-gpt2", n_embd=32, n_layer=2, n_head=2, n_positions=64)
    model = load_pretrained(str(folder))
    assert model.config.emb_dim == 32 and model.config.tie_weights and model.tokenizer.name == "gpt2"


def test_one_training_step_at_gpt2_124m_shape_matches_transformers(tmp_path):
    """GPT-2 124M's real sizes (768 wide, 12 layers, 12 heads, context 1,024), random weights: gptlib loads them
    and trains a step, with the same loss as transformers gives on the same batch."""
    folder = save_random_gpt2(tmp_path / "gpt2")  # GPT2Config() is the 124M configuration
    model = load_pretrained(str(folder))
    assert model.num_parameters() == 124_439_808
    examples = load_jsonl(ROOT / "dataset" / "sarcasm" / "sarcasm_instruction_pairs.jsonl")[:4]
    loader = instruction_loader(examples, batch_size=4, max_length=1024, shuffle=False)
    batch = next(iter(loader))
    hf_model = transformers.GPT2LMHeadModel.from_pretrained(folder, local_files_only=True).eval()
    with torch.no_grad():
        logits = hf_model(batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    hf_loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1), batch["labels"].flatten(), ignore_index=-100)
    before = model.blocks[11].att.qkv.weight.detach().clone()
    result = train(model, loader, cfg=TrainConfig(max_steps=1, lr=1e-4, eval_every=1, eval_batches=1, progress=False,
                                                  device="cpu", precision="fp32"))
    assert result.history["train_loss"][0] == pytest.approx(hf_loss.item(), rel=1e-4)  # the loss before the step
    assert result.steps == 1 and not torch.equal(model.blocks[11].att.qkv.weight, before)


def test_without_the_weights_the_switch_says_so_in_one_line_and_carries_on(tmp_path, monkeypatch, capsys):
    import tempfile

    from gptlib import workbook
    monkeypatch.setattr(workbook, "FAST", True)  # checkpoints in a temporary folder: this test's own
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    monkeypatch.setenv("GPTLIB_CACHE", str(tmp_path / "empty-cache"))
    assert workbook.gpt2_checkpoint() is None
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 1 and lines[0].startswith("USE_GPT2: GPT-2 cannot be had here (")
    assert lines[0].endswith("carries on with the workbook's own model")


def run_with_gpt2(name: str, env: dict) -> nbformat.NotebookNode:
    """Execute a notebook in fast mode with its USE_GPT2 flag turned on, as a learner turns it on."""
    nb = nbformat.read(NOTEBOOKS / name, as_version=4)
    flags = [cell for cell in nb.cells if cell.cell_type == "code" and "USE_GPT2 = False" in cell.source]
    assert len(flags) == 1, f"{name}: expected one cell that sets USE_GPT2 = False"
    flags[0].source = flags[0].source.replace("USE_GPT2 = False", "USE_GPT2 = True")
    for cell in nb.cells:
        cell.outputs = []
    probe = "import json\nprint('PROBE ' + json.dumps({k: str(v) for k, v in {%s}.items()}))"
    nb.cells.append(nbformat.v4.new_code_cell(probe % env.pop("_probe")))
    client = nbclient.NotebookClient(nb, timeout=1800, kernel_name="python3",
                                     resources={"metadata": {"path": str(NOTEBOOKS)}})
    client.execute(env=env)
    return nb


def printed(nb) -> str:
    return "".join(out.get("text", "") for cell in nb.cells if cell.cell_type == "code" for out in cell.outputs)


def probe(nb) -> dict:
    text = printed(nb)
    return json.loads(text[text.rindex("PROBE ") + 6:].splitlines()[0])


@pytest.fixture(scope="module")
def gpt2_env(tmp_path_factory):
    """The environment of a learner whose GPT-2 download is already in gptlib's cache (here: random weights in
    GPT-2's shape, only smaller), with the notebooks' checkpoints in a folder of this test's own."""
    if not PLAYS.exists():
        pytest.skip("needs `make data`")
    root = tmp_path_factory.mktemp("gpt2-notebooks")
    save_random_gpt2(root / "cache" / "gpt2", n_embd=64, n_layer=2, n_head=2, n_positions=256)
    return {**os.environ, "WORKBOOK_FAST": "1", "GPTLIB_CACHE": str(root / "cache"), "TMPDIR": str(root),
            "HF_HUB_OFFLINE": "1"}


def test_notebook_04_samples_gpt2(gpt2_env):
    nb = run_with_gpt2("04_pretraining.ipynb", {**gpt2_env, "_probe": '"path": gpt2_path'})
    assert "saved OpenAI's gpt2 as" in printed(nb) and "GPT-2 124M:\nROMEO:" in printed(nb)
    assert probe(nb)["path"].endswith("gpt2.pth")


def test_notebook_05_fine_tunes_gpt2_with_its_own_recipe(gpt2_env):
    nb = run_with_gpt2("05_instruction_finetuning.ipynb",
                       {**gpt2_env, "_probe": '"gpt2": USE_GPT2, "lr": cfg.lr, "steps": steps, "width": '
                                              'model.config.emb_dim, "tokenizer": model.tokenizer.name'})
    seen = probe(nb)
    assert seen == {"gpt2": "True", "lr": "0.0001", "steps": "6000", "width": "64", "tokenizer": "gpt2"}
    assert "gptlib eval, fresh process:" in printed(nb)


def test_notebook_07_fine_tunes_gpt2_and_its_lora_adapters_record_it(gpt2_env):
    nb = run_with_gpt2("07_sarcasm_example.ipynb",
                       {**gpt2_env, "_probe": '"gpt2": USE_GPT2, "lr": cfg.lr, "lora_lr": LORA_LR, "base": base_path'})
    seen = probe(nb)
    assert seen["gpt2"] == "True" and seen["lr"] == "5e-05" and seen["lora_lr"] == "0.0002"
    assert Path(seen["base"]).name == "gpt2.pth" and not Path(seen["base"]).is_relative_to(project_root())
