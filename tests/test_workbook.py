"""The workbook's own choices: its tokenizer and the precision its notebooks train in."""

import pytest
import torch

from gptlib import train_bpe
from gptlib.instructions import format_prompt
from gptlib.workbook import project_root, train_precision, workbook_tokenizer

PLAYS = project_root() / "dataset" / "pretraining" / "shakespeare_train.txt"


@pytest.mark.skipif(not PLAYS.exists(), reason="needs `make data`")
def test_workbook_tokenizer_knows_the_template_and_splits_digits():
    tokenizer = workbook_tokenizer()
    assert tokenizer.vocab_size == 2048 and tokenizer.name == "workbook-bpe-2048"
    assert tokenizer.to_dict() == workbook_tokenizer().to_dict()  # the same text always gives the same tokenizer
    prompt = format_prompt("Write the words in reverse order.", "apple river cold")
    plays_only = train_bpe([PLAYS.read_text(encoding="utf-8")], vocab_size=2048)
    assert len(tokenizer.encode(prompt)) < 0.7 * len(plays_only.encode(prompt))  # 48 against 93 tokens
    pieces = [tokenizer.decode([i]) for i in tokenizer.encode("What is 57 plus 168?")]
    assert pieces[2:] == [" ", "5", "7", " plus", " ", "1", "6", "8", "?"]


def test_notebooks_train_in_fp32_on_a_cpu():
    if torch.cuda.is_available() or torch.backends.mps.is_available():
        assert train_precision() == "auto"
    else:
        assert train_precision() == "fp32"


def test_paths_inside_the_project_are_shown_relative_to_it_and_others_as_they_are(tmp_path):
    from gptlib.workbook import project_root, short_path
    assert short_path(project_root() / "checkpoints" / "instruct.pth") == "checkpoints/instruct.pth"
    assert short_path(tmp_path / "x.pth") == str(tmp_path / "x.pth")
