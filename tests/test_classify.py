"""Classification: the collator and last-token pooling, training through the shared loop, checkpoints, the CLI."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from gptlib import GPTModel, TrainConfig, load_jsonl, load_model, save_checkpoint, split_examples, train, train_bpe
from gptlib.classify import (SARCASM_LABELS, ClassificationCollator, GPTClassifier, LabelledText, choose_trainable,
                             classification_loader, last_token_index, load_classifier, predict_proba,
                             sarcasm_texts, split_by_group)
from gptlib.errors import CheckpointError, UserInputError
from gptlib.evaluate import bootstrap_interval, classification_scores

from conftest import ROOT, tiny_config

SARCASM = ROOT / "dataset/sarcasm/sarcasm_instruction_pairs.jsonl"
SENTENCES = [("what a lovely sunny day it is", "happy"), ("i am so glad you came to see me", "happy"),
             ("this cake is wonderful and sweet", "happy"), ("we won the game and we sing", "happy"),
             ("the rain ruined my whole day", "sad"), ("i lost my keys and missed the bus", "sad"),
             ("the cat is ill and will not eat", "sad"), ("nobody came to my party at all", "sad")]


@pytest.fixture(scope="module")
def tokenizer():
    return train_bpe([s for s, _ in SENTENCES] * 20, 300)


def small_classifier(tokenizer, labels=("happy", "sad"), seed=0) -> GPTClassifier:
    torch.manual_seed(seed)
    return GPTClassifier(tiny_config(vocab_size=tokenizer.vocab_size), list(labels), tokenizer).eval()


def test_last_token_index_under_both_padding_sides():
    right = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1], [1, 0, 0, 0, 0]])
    left = torch.tensor([[0, 0, 1, 1, 1], [1, 1, 1, 1, 1], [0, 0, 0, 0, 1]])
    assert last_token_index(right).tolist() == [2, 4, 0]
    assert last_token_index(left).tolist() == [4, 4, 4]


@pytest.mark.parametrize("side", ["right", "left"])
def test_padded_batch_reads_each_text_at_its_last_real_token(tokenizer, side):
    model = small_classifier(tokenizer)
    texts = [s for s, _ in SENTENCES[:5]]
    encoded = [tokenizer.encode(t) for t in texts]
    assert len({len(ids) for ids in encoded}) > 1  # mixed lengths, so there is padding
    batch = ClassificationCollator(32, tokenizer.eot_id, padding_side=side)([(ids, 0) for ids in encoded])
    assert batch["labels"].tolist() == [0] * 5
    with torch.no_grad():
        batched = model(batch["input_ids"], batch["attention_mask"])
        alone = torch.cat([model(torch.tensor([ids])) for ids in encoded])
    torch.testing.assert_close(batched, alone, atol=1e-5, rtol=1e-4)


def test_collator_truncates_to_max_length_on_the_chosen_side():
    items = [(list(range(10)), 1), ([7, 8], 0)]
    right = ClassificationCollator(4, pad_id=99)(items)
    assert right["input_ids"].tolist() == [[0, 1, 2, 3], [7, 8, 99, 99]]
    assert right["attention_mask"].tolist() == [[1, 1, 1, 1], [1, 1, 0, 0]]
    left = ClassificationCollator(4, pad_id=99, padding_side="left", truncation="left")(items)
    assert left["input_ids"].tolist() == [[6, 7, 8, 9], [99, 99, 7, 8]]
    assert left["labels"].tolist() == [1, 0]


def test_a_tiny_classifier_overfits_a_handful_of_texts_through_the_training_loop(tokenizer, tmp_path):
    texts = [LabelledText(s, ["happy", "sad"].index(label)) for s, label in SENTENCES]
    model = small_classifier(tokenizer).train()
    loader = classification_loader(texts, tokenizer, batch_size=4, max_length=32, seed=1)
    cfg = TrainConfig(max_steps=80, lr=3e-3, eval_every=40, progress=False, precision="fp32",
                      checkpoint_path=str(tmp_path / "cls.pth"))
    result = train(model, loader, loader, cfg)
    assert result.history["val_loss"][-1] < 0.1 * result.history["val_loss"][0]
    probs = predict_proba(model, [t.text for t in texts])
    assert probs.argmax(1).tolist() == [t.label for t in texts]  # 100% on what it trained on
    # the saved checkpoint, loaded fresh, carries labels and tokenizer and gives the same probabilities
    loaded = load_classifier(tmp_path / "cls.pth")
    assert loaded.labels == ["happy", "sad"] and loaded.tokenizer.name == tokenizer.name
    torch.testing.assert_close(predict_proba(loaded, [t.text for t in texts]), probs)


def test_head_only_training_leaves_the_gpt_unchanged(tokenizer):
    texts = [LabelledText(s, ["happy", "sad"].index(label)) for s, label in SENTENCES]
    model = small_classifier(tokenizer).train()
    trainable = choose_trainable(model, "head")
    assert trainable == model.cls_head.weight.numel() + model.cls_head.bias.numel()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    loader = classification_loader(texts, tokenizer, batch_size=4, max_length=32)
    train(model, loader, None, TrainConfig(max_steps=5, lr=1e-2, progress=False, precision="fp32"))
    changed = {k for k, v in model.state_dict().items() if not torch.equal(v, before[k])}
    assert changed == {"cls_head.weight", "cls_head.bias"}
    assert choose_trainable(model, 1) < choose_trainable(model, 2) < choose_trainable(model, "all")
    with pytest.raises(UserInputError, match="number of blocks from 1 to 2"):
        choose_trainable(model, 3)


def test_a_pretrained_gpt_loads_into_a_classifier_unchanged(tokenizer):
    torch.manual_seed(0)
    gpt = GPTModel(tiny_config(vocab_size=tokenizer.vocab_size), tokenizer).eval()
    model = GPTClassifier.from_gpt(gpt, ["a", "b"]).eval()
    ids = torch.tensor([tokenizer.encode("what a lovely day")])
    torch.testing.assert_close(model.hidden_states(ids), gpt.hidden_states(ids))


def test_a_classifier_checkpoint_is_refused_where_a_language_model_is_expected(tokenizer, tmp_path):
    save_checkpoint(tmp_path / "cls.pth", small_classifier(tokenizer))
    with pytest.raises(CheckpointError, match=r"is a classifier \(labels \['happy', 'sad'\]\).*classify predict"):
        load_model(tmp_path / "cls.pth")
    torch.manual_seed(0)
    save_checkpoint(tmp_path / "lm.pth", GPTModel(tiny_config(vocab_size=tokenizer.vocab_size), tokenizer))
    with pytest.raises(CheckpointError, match="is a language model, not a classifier"):
        load_classifier(tmp_path / "lm.pth")


def test_sarcasm_split_keeps_both_answers_of_an_instruction_together_and_matches_notebook_07():
    texts = sarcasm_texts(SARCASM)
    assert len(texts) == 2 * sum(1 for line in SARCASM.read_text().splitlines() if line.strip())
    assert [t.label for t in texts[:2]] == [SARCASM_LABELS.index("sincere"), SARCASM_LABELS.index("sarcastic")]
    split = split_by_group(texts, seed=123)
    groups = [{t.group for t in part} for part in (split.train, split.val, split.test)]
    assert not (groups[0] & groups[1] or groups[0] & groups[2] or groups[1] & groups[2])
    for part in (split.train, split.val, split.test):  # both answers of each instruction, so balanced classes
        assert sum(t.label for t in part) * 2 == len(part)
    finetune_split = split_examples(load_jsonl(SARCASM), seed=123)
    assert groups[2] == {e.instruction for e in finetune_split.test}


def test_classification_scores_and_bootstrap_interval():
    true, pred = [1, 1, 1, 0, 0, 0, 1, 0], [1, 1, 0, 0, 0, 1, 1, 0]
    scores = classification_scores(true, pred)
    assert scores["accuracy"] == 6 / 8 and scores["precision"] == 3 / 4 and scores["recall"] == 3 / 4
    assert scores["f1"] == pytest.approx(0.75)
    sklearn = pytest.importorskip("sklearn.metrics")
    assert scores["f1"] == pytest.approx(sklearn.f1_score(true, pred))
    assert classification_scores([0, 0], [0, 0])["precision"] == 0.0  # no positive predicted: 0, as scikit-learn
    low, high = bootstrap_interval(true * 10, pred * 10, samples=500)
    assert low < 0.75 < high and high - low < 0.25


# ---------------------------------------------------------------- the command line

def gptlib_cli(*args, cwd):
    return subprocess.run([sys.executable, "-m", "gptlib.cli", *map(str, args)], cwd=cwd, capture_output=True,
                          text=True)


@pytest.fixture
def base_checkpoint(tokenizer, tmp_path) -> Path:
    torch.manual_seed(0)
    path = tmp_path / "base.pth"
    save_checkpoint(path, GPTModel(tiny_config(vocab_size=tokenizer.vocab_size), tokenizer))
    return path


def write_jsonl(path: Path, rows) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_cli_trains_and_predicts_end_to_end(base_checkpoint, tmp_path):
    rows = [{"text": s, "label": label} for s, label in SENTENCES * 3]
    data = write_jsonl(tmp_path / "moods.jsonl", rows)
    done = gptlib_cli("classify", "train", "--checkpoint", base_checkpoint, "--data", data, "--out", "mood.pth",
                      "--max-steps", 60, "--lr", 3e-3, "--eval-every", 30, "--quiet", cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    assert "test split" in done.stderr and "accuracy" in done.stderr
    metrics = json.loads((tmp_path / "mood.metrics.json").read_text())
    assert metrics["labels"] == ["happy", "sad"] and 0 <= metrics["test"]["accuracy"] <= 1
    assert not (tmp_path / "mood.progress.pth").exists()

    done = gptlib_cli("classify", "predict", "--checkpoint", "mood.pth", "--text", SENTENCES[0][0], "--text",
                      SENTENCES[-1][0], cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    lines = [line.split("\t") for line in done.stdout.splitlines()]
    assert [(label, text) for label, _, text in lines] == [("happy", SENTENCES[0][0]), ("sad", SENTENCES[-1][0])]
    assert all(0.5 <= float(p) <= 1 for _, p, _ in lines)

    done = gptlib_cli("classify", "predict", "--checkpoint", "mood.pth", "--data", data, "--out", "preds.jsonl",
                      cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    predictions = [json.loads(line) for line in (tmp_path / "preds.jsonl").read_text().splitlines()]
    assert len(predictions) == len(rows) and "accuracy: 1.000" in done.stderr


def test_cli_trains_on_the_sarcasm_pairs_directly(base_checkpoint, tmp_path):
    done = gptlib_cli("classify", "train", "--checkpoint", base_checkpoint, "--data", SARCASM, "--out", "j.pth",
                      "--max-steps", 2, "--quiet", cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    assert "1142 train / 68 validation / 134 test texts, labels ['sincere', 'sarcastic']" in done.stderr
    assert load_classifier(tmp_path / "j.pth").labels == SARCASM_LABELS


@pytest.mark.parametrize("rows, message", [
    ([{"text": "good", "label": "a"}] * 30, "every line has the label 'a'"),
    ([{"text": "good", "label": "a"}, {"text": "  ", "label": "b"}], "line 2: field 'text' must be a non-empty"),
    ([{"text": "good", "label": "a"}, {"txt": "bad", "label": "b"}], "line 2: no 'text' field"),
    ([{"text": "good", "label": "a"}, {"text": "bad", "label": ["b"]}], "line 2: field 'label' must be"),
])
def test_cli_train_rejects_bad_data_with_exit_2_and_writes_nothing(base_checkpoint, tmp_path, rows, message):
    data = write_jsonl(tmp_path / "bad.jsonl", rows)
    done = gptlib_cli("classify", "train", "--checkpoint", base_checkpoint, "--data", data, "--out", "c.pth",
                      cwd=tmp_path)
    assert done.returncode == 2 and done.stderr.startswith("error:") and message in done.stderr, done.stderr
    assert "Traceback" not in done.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad.jsonl", "base.pth"]


def test_cli_predict_rejects_bad_input_with_exit_2(base_checkpoint, tokenizer, tmp_path):
    save_checkpoint(tmp_path / "cls.pth", small_classifier(tokenizer))
    unknown = write_jsonl(tmp_path / "unknown.jsonl", [{"text": "fine", "label": "happy"},
                                                         {"text": "odd", "label": "angry"}])
    cases = [(["--text", "  "], "--text number 1 is empty"),
             (["--data", unknown], "line 2: unknown label 'angry'; this classifier knows ['happy', 'sad']"),
             (["--text", "hi", "--data", unknown], "one of the two"),
             (["--checkpoint", base_checkpoint, "--text", "hi"], "is a language model, not a classifier")]
    for extra, message in cases:
        checkpoint = [] if "--checkpoint" in extra else ["--checkpoint", tmp_path / "cls.pth"]
        done = gptlib_cli("classify", "predict", *checkpoint, *extra, cwd=tmp_path)
        assert done.returncode == 2 and done.stderr.startswith("error:") and message in done.stderr, done.stderr
    done = gptlib_cli("generate", "--checkpoint", tmp_path / "cls.pth", "hello", cwd=tmp_path)
    assert done.returncode == 2 and "is a classifier" in done.stderr
