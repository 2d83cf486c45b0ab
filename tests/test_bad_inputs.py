"""Inputs that used to destroy a user's file or crash with a traceback (issue 12).

Every row of ``CATALOGUE`` runs one command on a tiny model and tiny data in a fresh folder and checks the
contract of DESIGN.md: exit status 2, one ``error:`` line that names the problem, and not one file created,
changed or deleted. The tests after the catalogue cover what is not a refusal: files that must be read (BOM,
CRLF), permissions, the lock on ``--out``, SIGTERM, and training that diverges.
"""

import hashlib
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from gptlib import GPTModel, save_checkpoint
from gptlib.cli import main
from gptlib.config import preset

from conftest import ROOT

HANG_GUARD = 1800  # seconds: only against a hung subprocess, never a speed check

PAIRS = [{"instruction": f"Say {word}.", "response": f"{word.capitalize()}!"}
         for word in "hi yes no maybe soon later now here there up down left right in out on off one two "
                     "three four five six seven eight nine ten red".split()]


def tiny_model(**overrides) -> GPTModel:
    torch.manual_seed(0)
    return GPTModel(preset("tiny", n_layers=1, emb_dim=32, n_heads=2, context_length=128, **overrides))


@pytest.fixture(scope="module")
def assets(tmp_path_factory) -> Path:
    """Files made once; each test copies what it needs into its own folder."""
    d = tmp_path_factory.mktemp("assets")
    save_checkpoint(d / "base.pth", tiny_model())
    poisoned = tiny_model()
    with torch.no_grad():
        poisoned.blocks[0].ff.fc.weight[3, 5] = float("nan")
    save_checkpoint(d / "nan.pth", poisoned)
    save_checkpoint(d / "vocab1000.pth", tiny_model(vocab_size=1000))
    (d / "pairs.jsonl").write_text("".join(json.dumps(p) + "\n" for p in PAIRS), encoding="utf-8")
    (d / "text.txt").write_text("To be, or not to be, that is the question. " * 40, encoding="utf-8")
    return d


@pytest.fixture
def folder(assets, tmp_path) -> Path:
    for name in ("base.pth", "pairs.jsonl", "text.txt"):
        shutil.copy2(assets / name, tmp_path / name)
    return tmp_path


def snapshot(folder: Path) -> dict:
    """Every file under ``folder``: size, modification time, permissions and content hash."""
    return {str(p.relative_to(folder)): (p.stat().st_size, p.stat().st_mtime_ns, p.stat().st_mode,
                                         hashlib.sha256(p.read_bytes()).hexdigest())
            for p in sorted(folder.rglob("*")) if p.is_file()}


# ---------------------------------------------------------------- set-ups for the rows that need more files

def copy_asset(name: str, as_name: str | None = None):
    def setup(d: Path, assets: Path) -> None:
        shutil.copy2(assets / name, d / (as_name or name))
    return setup


def write_file(name: str, content: bytes | str):
    def setup(d: Path, assets: Path) -> None:
        path = d / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(content if isinstance(content, bytes) else content.encode())
    return setup


def checkpoint_in_export_folder(d: Path, assets: Path) -> None:
    (d / "export").mkdir()
    shutil.copy2(assets / "base.pth", d / "export" / "model.pth")
    (d / "export" / "notes.txt").write_text("mine")


class RunsCode:
    """Unpickling this calls os.system: what a malicious checkpoint does."""

    def __reduce__(self):
        return (os.system, ("echo this should never run",))


def checkpoint_that_runs_code(d: Path, assets: Path) -> None:
    torch.save({"model_state_dict": {}, "payload": RunsCode()}, d / "code.pth")


def deeply_nested_line(d: Path, assets: Path) -> None:
    nested = "[" * 100_000 + "]" * 100_000
    (d / "nested.jsonl").write_text(json.dumps(PAIRS[0]) + "\n"
                                    + '{"instruction": "a", "response": "b", "extra": ' + nested + "}\n")


FINETUNE = ["finetune", "--checkpoint", "{d}/base.pth", "--data", "{d}/pairs.jsonl", "--out", "{d}/out.pth",
            "--max-steps", "2", "--quiet"]
EVAL = ["eval", "--checkpoint", "{d}/base.pth", "--data", "{d}/pairs.jsonl", "--limit", "2",
        "--max-new-tokens", "2", "--quiet"]
GENERATE = ["generate", "--checkpoint", "{d}/base.pth", "Hello", "--max-new-tokens", "2"]


def with_flags(base: list[str], **flags) -> list[str]:
    """``base`` with each ``--flag`` replaced (or added); a value of None adds a bare switch."""
    argv = list(base)
    for key, value in flags.items():
        flag = "--" + key.rstrip("_").replace("_", "-")
        if flag in argv and value is not None:
            argv[argv.index(flag) + 1] = value
        else:
            argv += [flag] if value is None else [flag, value]
    return argv


NO_CUDA = torch.cuda.is_available()
BOTH_SIZES = (r"1,?000\b", r"50,?25[67]")  # the model's vocabulary and what the token ids need

# (id, argv, regular expressions the error must match, set-up, text that must not appear)
CATALOGUE = [
    ("checkpoint is the progress file of --out",
     with_flags(FINETUNE, checkpoint="{d}/prev.progress.pth", out="{d}/prev.pth"),
     [r"prev\.progress\.pth"], copy_asset("base.pth", "prev.progress.pth"), None),
    ("--predictions is the --data file", with_flags(EVAL, predictions="{d}/pairs.jsonl"),
     [r"--predictions", r"pairs\.jsonl"], None, None),
    ("--predictions exists, no --overwrite", with_flags(EVAL, predictions="{d}/pred.jsonl"),
     [r"pred\.jsonl.*already exists", r"--overwrite"], write_file("pred.jsonl", "keep me\n"), None),
    ("--lr 1e30 diverges; --overwrite keeps the good model",
     with_flags(FINETUNE, out="{d}/keep.pth", lr="1e30", overwrite=None),
     [r"step \d", r"--lr"], copy_asset("base.pth", "keep.pth"), None),
    ("--lr inf", with_flags(FINETUNE, lr="inf"), [r"--lr", r"finite"], None, None),
    ("--weight-decay nan", with_flags(FINETUNE, weight_decay="nan"), [r"--weight-decay", r"nan"], None, None),
    ("--lr -1e-4 with a space", with_flags(FINETUNE, lr="-1e-4"), [r"--lr", r"positive"], None, None),
    ("--drop-rate 2", with_flags(FINETUNE, drop_rate="2"), [r"--drop-rate", r"\[0, 1\)"], None, None),
    ("--seed 2**70 (finetune)", with_flags(FINETUNE, seed=str(2**70)), [r"--seed", r"64 bits"], None, None),
    ("--seed 2**70 (generate)", with_flags(GENERATE, seed=str(2**70), temperature="1"),
     [r"--seed", r"64 bits"], None, None),
    ("--temperature nan", with_flags(GENERATE, temperature="nan"), [r"--temperature", r"finite"], None, None),
    ("--max-new-tokens 10**12 (generate)", with_flags(GENERATE, max_new_tokens=str(10**12)),
     [r"--max-new-tokens", r"\d+(\.\d+)? [KMGTP]?B"], None, None),
    ("--max-new-tokens 10**12 (eval)", with_flags(EVAL, max_new_tokens=str(10**12)),
     [r"--max-new-tokens", r"\d+(\.\d+)? [KMGTP]?B"], None, None),
    ("OUT.metrics.json exists, OUT does not", FINETUNE, [r"out\.metrics\.json.*already exists", r"--overwrite"],
     write_file("out.metrics.json", "{}"), None),
    ("OUT.loss.png exists, OUT does not", FINETUNE, [r"out\.loss\.png.*already exists", r"--overwrite"],
     write_file("out.loss.png", b"\x89PNG mine"), None),
    ("checkpoint inside the export folder",
     ["export", "--checkpoint", "{d}/export/model.pth", "--to-hf", "{d}/export", "--overwrite"],
     [r"model\.pth", r"inside"], checkpoint_in_export_folder, None),
    ("NaN weights (generate)", with_flags(GENERATE, checkpoint="{d}/nan.pth"),
     [r"nan\.pth", r"blocks\.0\.ff\.fc\.weight", r"not finite"], copy_asset("nan.pth"), None),
    ("NaN weights (eval --json)", with_flags(EVAL, checkpoint="{d}/nan.pth", json=None),
     [r"blocks\.0\.ff\.fc\.weight", r"not finite"], copy_asset("nan.pth"), None),
    ("NaN weights (finetune)", with_flags(FINETUNE, checkpoint="{d}/nan.pth"),
     [r"blocks\.0\.ff\.fc\.weight", r"not finite"], copy_asset("nan.pth"), None),
    pytest.param("--device cuda without CUDA", with_flags(GENERATE, device="cuda"),
                 [r"--device cuda", r"cpu"], None, None,
                 marks=pytest.mark.skipif(NO_CUDA, reason="this machine has CUDA")),
    ("--device tpu", with_flags(GENERATE, device="tpu"), [r"--device tpu", r"cpu"], None, None),
    ("vocabulary of 1,000 with GPT-2 ids (generate)", with_flags(GENERATE, checkpoint="{d}/vocab1000.pth"),
     [r"1,?000\b", r"(15,?49[67]|50,?25[67])"], copy_asset("vocab1000.pth"), None),  # "Hello" is id 15496
    ("vocabulary of 1,000 with GPT-2 ids (eval)", with_flags(EVAL, checkpoint="{d}/vocab1000.pth"),
     BOTH_SIZES, copy_asset("vocab1000.pth"), None),
    ("vocabulary of 1,000 with GPT-2 ids (finetune)", with_flags(FINETUNE, checkpoint="{d}/vocab1000.pth"),
     BOTH_SIZES, copy_asset("vocab1000.pth"), None),
    pytest.param("--out in a folder that refuses writes", with_flags(FINETUNE, out="/proc/x.pth"),
                 [r"/proc/x\.pth"], None, None,
                 marks=pytest.mark.skipif(not os.access("/proc", os.W_OK), reason="needs a /proc that "
                                          "os.access calls writable (as root on Linux)")),
    ("pretrain --emb-dim 4000000",
     ["pretrain", "--data", "{d}/text.txt", "--out", "{d}/big.pth", "--emb-dim", "4000000", "--quiet"],
     [r"--emb-dim", r"\d+(\.\d+)? [KMGTP]?B", r"memory"], None, None),
    ("checkpoint that pickles os.system", with_flags(GENERATE, checkpoint="{d}/code.pth"),
     [r"code\.pth", r"pickled"], checkpoint_that_runs_code, "weights_only=False"),
    ("100,000-deep nested JSON (validate)", ["validate", "--data", "{d}/nested.jsonl"],
     [r"nested\.jsonl:2:", r"too deeply"], deeply_nested_line, None),
    ("invalid JSON message wording (validate)", ["validate", "--data", "{d}/control.jsonl"],
     [r"control\.jsonl:1: invalid JSON"], write_file("control.jsonl", '{"instruction": "a\x01", "response": "b"}\n'),
     "at at"),
]


def _row_id(row):
    return row.values[0] if hasattr(row, "values") else row[0]


@pytest.mark.parametrize("name, argv, patterns, setup, forbidden", CATALOGUE, ids=[_row_id(r) for r in CATALOGUE])
def test_bad_input_is_refused_and_nothing_changes(folder, assets, capsys, name, argv, patterns, setup, forbidden):
    if setup is not None:
        setup(folder, assets)
    before = snapshot(folder)
    code = main([a.format(d=folder) for a in argv])
    captured = capsys.readouterr()
    err_lines = captured.err.splitlines()
    assert code == 2, captured.err
    assert err_lines and err_lines[-1].startswith("error: "), captured.err
    assert sum(line.startswith("error:") for line in err_lines) == 1, captured.err
    shown = captured.out + captured.err  # `validate` lists each problem on stdout, then one error line
    for pattern in patterns:
        assert re.search(pattern.format(d=folder), shown), (pattern, shown)
    assert "Traceback" not in shown
    if forbidden:
        assert forbidden not in shown
    assert snapshot(folder) == before  # nothing written, nothing changed, nothing deleted


# ---------------------------------------------------------------- files that must be read, not refused

@pytest.mark.parametrize("encoding", ["bom", "crlf", "bom+crlf"])
def test_jsonl_with_a_bom_or_crlf_reads_like_plain_utf8(folder, capsys, encoding):
    from gptlib.instructions import load_jsonl
    plain = (folder / "pairs.jsonl").read_bytes()
    raw = plain.replace(b"\n", b"\r\n") if "crlf" in encoding else plain
    raw = b"\xef\xbb\xbf" + raw if "bom" in encoding else raw
    path = folder / "windows.jsonl"
    path.write_bytes(raw)
    assert load_jsonl(path) == load_jsonl(folder / "pairs.jsonl")
    assert main(["validate", "--data", str(path)]) == 0
    assert capsys.readouterr().out.startswith(f"ok: {len(PAIRS)} examples")


def test_pretraining_text_with_a_bom_and_crlf_reads_like_plain_utf8(folder):
    from gptlib.recipes import read_text
    plain = folder / "text.txt"
    windows = folder / "windows.txt"
    windows.write_bytes(b"\xef\xbb\xbf" + plain.read_bytes().replace(b". ", b".\r\n"))
    assert read_text(windows) == plain.read_text().replace(". ", ".\n")


# ---------------------------------------------------------------- permissions

def test_export_writes_files_with_the_usual_permissions(folder, capsys):
    pytest.importorskip("transformers")
    old = os.umask(0o022)
    try:
        code = main(["export", "--checkpoint", str(folder / "base.pth"), "--to-hf", str(folder / "hf")])
    finally:
        os.umask(old)
    assert code == 0, capsys.readouterr().err
    modes = {p.name: p.stat().st_mode & 0o777 for p in (folder / "hf").iterdir()}
    assert modes and all(mode == 0o644 for mode in modes.values()), modes
    assert (folder / "hf").stat().st_mode & 0o777 == 0o755


def test_finetune_outputs_have_the_usual_permissions(folder, capsys):
    old = os.umask(0o022)
    try:
        code = main([a.format(d=folder) for a in FINETUNE])
    finally:
        os.umask(old)
    assert code == 0, capsys.readouterr().err
    for name in ("out.pth", "out.metrics.json", "out.loss.png"):
        assert (folder / name).stat().st_mode & 0o777 == 0o644, name
    assert not list(folder.glob("*.lock"))


def test_a_failed_write_names_the_path(tmp_path):
    from gptlib.errors import UserInputError
    from gptlib.files import atomic_write
    target = tmp_path / "missing" / "x.json"
    with pytest.raises(UserInputError, match=re.escape(str(target))):
        atomic_write(target, lambda tmp: tmp.write_text("{}"))


# ---------------------------------------------------------------- guards callable from Python

def test_generation_refuses_token_ids_beyond_the_vocabulary():
    from gptlib.errors import UserInputError
    from gptlib.generate import generate
    model = tiny_model(vocab_size=1000).eval()
    with pytest.raises(UserInputError, match=r"5,?000.*1,?000"):
        generate(model, [1, 5000], max_new_tokens=2)
    assert len(generate(model, [1, 999], max_new_tokens=2, eos_id=None)) == 2


def test_a_checkpoint_with_an_infinite_optimizer_moment_is_refused(tmp_path):
    from gptlib.checkpoint import read_checkpoint
    from gptlib.errors import CheckpointError
    model = tiny_model()
    optimizer = torch.optim.AdamW(model.parameters())
    model.loss(torch.tensor([[1, 2, 3]]), torch.tensor([[2, 3, 4]])).backward()
    optimizer.step()
    optimizer.state[model.pos_emb.weight]["exp_avg"][0, 0] = float("inf")
    save_checkpoint(tmp_path / "m.pth", model, optimizer)
    with pytest.raises(CheckpointError, match=r"optimizer.*exp_avg.*not finite"):
        read_checkpoint(tmp_path / "m.pth")


def test_training_that_diverges_stops_naming_the_step_and_keeps_the_last_good_save(tmp_path):
    from gptlib.data import window_loader
    from gptlib.errors import TrainingDiverged
    from gptlib.train import TrainConfig, train
    model = tiny_model()
    loader = window_loader(list(range(2000)), 16, 4, shuffle=False)
    progress = tmp_path / "run.progress.pth"

    def poison(step, loss):
        if step == 3:
            with torch.no_grad():
                model.final_norm.weight.fill_(float("nan"))

    cfg = TrainConfig(max_steps=6, lr=1e-3, eval_every=100, save_every=1, checkpoint_path=str(progress),
                      device="cpu", precision="fp32", progress=False)
    with pytest.raises(TrainingDiverged, match=r"step [34]\b") as caught:
        train(model, loader, None, cfg, on_step=poison)
    assert str(progress) in str(caught.value)
    saved = torch.load(progress, weights_only=True)
    assert saved["train_state"]["step"] == 2
    assert all(torch.isfinite(t).all() for t in saved["model_state_dict"].values())


def test_no_test_limits_wall_clock_time():
    """Timeouts in tests only guard against a hung process: far above any plausible run (issue 12)."""
    for path in (ROOT / "tests").glob("*.py"):
        text = path.read_text()
        for value in re.findall(r"timeout\s*=\s*(\d+)", text) + re.findall(r"\(\)\s*-\s*\w+\s*<=?\s*(\d+)", text):
            assert int(value) >= HANG_GUARD, f"{path.name}: a time limit of {value} s"


# ---------------------------------------------------------------- the lock on --out, SIGTERM (real processes)

def gptlib_process(argv, **kwargs):
    return subprocess.Popen([sys.executable, "-m", "gptlib.cli", *map(str, argv)], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, cwd=ROOT, **kwargs)


def wait_for(path: Path, proc) -> None:
    deadline = time.monotonic() + HANG_GUARD
    while not path.exists():
        assert proc.poll() is None, proc.communicate()
        assert time.monotonic() < deadline, "hung"
        time.sleep(0.02)


def test_a_live_lock_refuses_a_second_run_naming_the_first(folder, capsys):
    holder = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(1800)"])
    try:
        lock = folder / "out.pth.lock"
        lock.write_text(json.dumps({"pid": holder.pid, "host": os.uname().nodename, "command": "gptlib finetune"}))
        before = snapshot(folder)
        code = main([a.format(d=folder) for a in FINETUNE])
        err = capsys.readouterr().err
        assert code == 2 and err.startswith("error: ") and err.count("\n") == 1, err
        assert str(holder.pid) in err and "out.pth" in err
        assert snapshot(folder) == before
    finally:
        holder.kill()
        holder.wait()


def test_a_stale_lock_from_a_dead_process_is_taken_over(folder, capsys):
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    lock = folder / "out.pth.lock"
    lock.write_text(json.dumps({"pid": dead.pid, "host": os.uname().nodename, "command": "gptlib finetune"}))
    code = main([a.format(d=folder) for a in FINETUNE])
    assert code == 0, capsys.readouterr().err
    assert (folder / "out.pth").exists() and not lock.exists()


@pytest.mark.slow
def test_second_concurrent_run_fails_and_sigterm_saves_progress(folder):
    args = [a.format(d=folder) for a in with_flags(FINETUNE, max_steps="100000", save_every="2",
                                                    eval_every="100000")]
    first = gptlib_process(args)
    try:
        progress = folder / "out.progress.pth"
        wait_for(progress, first)
        second = gptlib_process([a.format(d=folder) for a in FINETUNE])  # same --out, two steps
        _, err = second.communicate(timeout=HANG_GUARD)
        assert second.returncode == 2 and err.startswith("error: ") and str(first.pid) in err, err
        first.send_signal(signal.SIGTERM)
        _, err = first.communicate(timeout=HANG_GUARD)
    finally:
        if first.poll() is None:
            first.kill()
    assert first.returncode != 0 and first.returncode != -signal.SIGTERM, err
    assert "--resume" in err and "Traceback" not in err
    assert torch.load(progress, weights_only=True)["train_state"]["step"] >= 2
    assert not (folder / "out.pth").exists() and not (folder / "out.pth.lock").exists()
