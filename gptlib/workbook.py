"""Set-up helpers for the workbook's notebooks: where files go, full or fast mode, versions.

``WORKBOOK_FAST=1`` makes every notebook take the same steps at tiny sizes (tests run them this way), and
sends its checkpoints and figures to a temporary folder so a fast run never overwrites a full run's files.
"""

from __future__ import annotations

import os
import platform
import tempfile
from importlib import metadata
from pathlib import Path

FAST = os.environ.get("WORKBOOK_FAST", "") not in ("", "0")

# The workbook's own tokenizer: a byte-level BPE of this many tokens trained on the Shakespeare training text
# and the instruction template (see workbook_tokenizer).
# Chosen by measurement (notebook 01 and the README): see WORKBOOK_VOCAB_SIZE's note in the README.
WORKBOOK_VOCAB_SIZE = 2048


def pick(full, fast):
    """``full`` normally, ``fast`` when WORKBOOK_FAST=1: ``steps = pick(2000, 20)``."""
    return fast if FAST else full


def project_root(start: Path | None = None) -> Path:
    """The workbook's folder (the one holding ``dataset/`` and ``pyproject.toml``), found from the working directory."""
    here = (start or Path.cwd()).resolve()
    for folder in (here, *here.parents):
        if (folder / "pyproject.toml").exists() and (folder / "dataset").is_dir():
            return folder
    raise FileNotFoundError(f"cannot find the workbook folder above {here}: open the notebook from the project's "
                            "notebooks/ folder (on Colab: %cd into the cloned repository first)")


def checkpoint_dir() -> Path:
    """``checkpoints/`` in the project, or a temporary folder in fast mode."""
    folder = Path(tempfile.gettempdir()) / "gptlib-workbook-fast" if FAST else project_root() / "checkpoints"
    folder.mkdir(parents=True, exist_ok=True)
    return folder


def short_path(path) -> str:
    """``path`` as a learner would type it: relative to the workbook's folder when it is inside it
    (``checkpoints/instruct.pth``), else as it is (a fast run's temporary folder)."""
    try:
        return str(Path(path).resolve().relative_to(project_root()))
    except ValueError:
        return str(path)


def show_versions() -> None:
    """Print the versions that matter, so a learner can compare with the outputs shown."""
    import torch

    from .device import pick_device
    names = ["torch", "tiktoken", "matplotlib", "pandas"]
    found = []
    for name in names:
        try:
            found.append(f"{name} {metadata.version(name)}")
        except metadata.PackageNotFoundError:
            pass
    print(f"python {platform.python_version()} | " + " | ".join(found))
    print(f"device: {pick_device()} | threads: {torch.get_num_threads()} | mode: {'FAST (tests)' if FAST else 'full'}")


def training_plays() -> str:
    """The text of ``dataset/pretraining/shakespeare_train.txt`` (made by ``make data``)."""
    return (project_root() / "dataset/pretraining/shakespeare_train.txt").read_text(encoding="utf-8")


def workbook_tokenizer(vocab_size: int = WORKBOOK_VOCAB_SIZE):
    """The workbook's BPE (about 2 seconds; the same text and size always give the same tokenizer).

    Trained on what the workbook's models read: the training plays, and the instruction prompt template around
    each task's instruction (``tasks.template_text``: 48 tokens per prompt instead of 81, no task words). Numbers
    are split into single digits (``split_digits``).
    """
    from .tasks import template_text
    from .tokenizer import train_bpe
    text = training_plays()
    return train_bpe([text, template_text()], vocab_size, name=f"workbook-bpe-{vocab_size}", split_digits=True)


def train_precision() -> str:
    """What the notebooks train in: "fp32" on a CPU, "auto" (bf16 where native) on a GPU.

    Measured on this workbook's 1.3M-parameter model on a CPU with native bf16 (AVX-512 BF16): bf16 autocast made
    each training step 1.9x *slower* (notebook 04: 375 s vs 206 s), because its conversions cost more than its
    smaller matrix products save at this size; and fp32 runs the same work on CPUs with and without native bf16.
    """
    from .device import pick_device
    return "fp32" if pick_device().type == "cpu" else "auto"


def load_or_make_pretrained(name: str = "pretrained.pth", quick_steps: int = 150):
    """The model notebook 04 saved; if there is none yet, say so and pretrain a quick one here.

    Returns ``(model, path)``. The quick model is saved as ``pretrained_quick.pth``, never under the real name.
    """
    from .checkpoint import load_model, save_checkpoint
    from .config import preset
    from .data import window_loader
    from .device import set_seed
    from .model import GPTModel
    from .train import TrainConfig, train

    path = checkpoint_dir() / name
    if path.exists():
        model, _ = load_model(path)
        print(f"loaded {short_path(path)}")
        return model, path
    quick = checkpoint_dir() / "pretrained_quick.pth"
    if quick.exists():
        model, _ = load_model(quick)
        print(f"no {short_path(path)} yet; loaded the quick model {short_path(quick)}")
        return model, quick
    steps = pick(quick_steps, 5)
    print(f"no {short_path(path)} yet (notebook 04 makes it): pretraining a quick stand-in for {steps} steps instead")
    set_seed(123)
    text = training_plays()
    tokenizer = workbook_tokenizer()
    model = GPTModel(preset("tiny", vocab_size=tokenizer.vocab_size), tokenizer=tokenizer)
    loader = window_loader(tokenizer.encode(text[: 2_000_000]), model.config.context_length, batch_size=8)
    train(model, loader, cfg=TrainConfig(max_steps=steps, lr=2e-3, warmup_steps=min(20, steps), eval_every=steps,
                                         eval_batches=2, precision=train_precision()))
    save_checkpoint(quick, model)
    return model, quick


def load_or_make_sarcasm(base_model, name: str = "sarcasm.pth"):
    """The model notebook 07 fine-tuned on the sarcasm pairs; if there is none yet, fine-tune one here the same way.

    Returns ``(model, path)``. The stand-in is saved as ``sarcasm_quick.pth``, never under the real name.
    """
    import copy

    from .checkpoint import load_model
    from .data import instruction_loader
    from .device import set_seed
    from .instructions import load_jsonl, split_examples
    from .train import TrainConfig, train

    path = checkpoint_dir() / name
    quick = checkpoint_dir() / "sarcasm_quick.pth"
    for found in (path, quick):
        if found.exists():
            model, _ = load_model(found)
            print(f"loaded {short_path(found)}")
            return model, found
    print(f"no {short_path(path)} yet (notebook 07 makes it): "
          "fine-tuning a stand-in with notebook 07's settings instead")
    split = split_examples(load_jsonl(project_root() / "dataset/sarcasm/sarcasm_instruction_pairs.jsonl"), seed=123)
    model = copy.deepcopy(base_model)
    make = dict(max_length=model.config.context_length, tokenizer=model.tokenizer)
    set_seed(123)
    train(model, instruction_loader(split.train, batch_size=8, seed=123, **make),
          instruction_loader(split.val, batch_size=8, shuffle=False, **make),
          TrainConfig(epochs=pick(8, 1), max_steps=pick(None, 4), lr=5e-4, weight_decay=0.1, warmup_steps=pick(20, 1),
                      schedule="constant", eval_every=pick(25, 2), eval_batches=pick(20, 1), patience=3,
                      checkpoint_path=str(quick), seed=123, precision=train_precision()))
    return model, quick


def gpt2_checkpoint(name: str = "gpt2") -> Path | None:
    """OpenAI's GPT-2 (:func:`gptlib.hf.load_pretrained`), saved once as ``<name>.pth`` beside the workbook's
    checkpoints so that it is a file like any other: LoRA adapters record their base's path, benchmarks load it.

    Returns None, after one line saying why, when it cannot be had here (no network, no transformers): the
    notebooks then carry on with the workbook's own model.
    """
    from .checkpoint import save_checkpoint
    from .errors import UserInputError
    from .hf import load_pretrained

    path = checkpoint_dir() / f"{name}.pth"
    if path.exists():
        return path
    try:
        model = load_pretrained(name)
    except UserInputError as exc:
        print(f"USE_GPT2: GPT-2 cannot be had here ({str(exc).split(';')[0]}), so this notebook carries on with "
              "the workbook's own model")
        return None
    save_checkpoint(path, model)
    print(f"saved OpenAI's {name} as {short_path(path)} ({model.num_parameters():,} parameters)")
    return path


def load_base(use_gpt2: bool = False):
    """The model a notebook starts from, as ``(model, path, is_gpt2)``: OpenAI's GPT-2 124M when ``use_gpt2`` is
    set and it can be had (see :func:`gpt2_checkpoint`), else notebook 04's model (:func:`load_or_make_pretrained`)."""
    from .checkpoint import load_model

    path = gpt2_checkpoint() if use_gpt2 else None
    if path is None:
        return (*load_or_make_pretrained(), False)
    model, _ = load_model(path)
    print(f"loaded {short_path(path)}: OpenAI's GPT-2 124M")
    return model, path, True
