"""Batched generation: many prompts of different lengths at once give what each prompt gives alone."""
import pytest
import torch

from gptlib import GPTModel, SamplingSettings, TrainConfig, generate, train, window_loader
from gptlib.generate import answer_instruction, answer_instructions, generate_batch

from conftest import tiny_config

VOCAB = 300


def _successor(token: int) -> int:
    return (token * 7 + 3) % VOCAB


@pytest.fixture(scope="module")
def trained_model() -> GPTModel:
    """A tiny model trained until it follows a fixed token -> next-token rule: confident, far from ties."""
    torch.manual_seed(0)
    stream = []
    for start in torch.randint(VOCAB, (800,)).tolist():  # short chains from random starts: every token is seen
        token = start
        for _ in range(8):
            stream.append(token)
            token = _successor(token)
    model = GPTModel(tiny_config(vocab_size=VOCAB, context_length=192, emb_dim=64))
    loader = window_loader(stream, 64, batch_size=16, shuffle=True, seed=1)
    train(model, loader, cfg=TrainConfig(max_steps=400, lr=1e-2, eval_every=400, eval_batches=1, progress=False))
    return model.eval()


def _prompts(lengths, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(VOCAB, (n,), generator=g).tolist() for n in lengths]


def test_the_fixture_model_learned_its_rule(trained_model):
    out = generate(trained_model, [11], 5, eos_id=None)
    assert out == [_successor(11), _successor(_successor(11)), *out[2:]]  # not a tie-breaking accident


def test_batched_greedy_equals_one_prompt_at_a_time_for_mixed_lengths(trained_model):
    prompts = _prompts([1, 3, 7, 12, 2, 20, 5, 9])
    alone = [generate(trained_model, p, 10, eos_id=None) for p in prompts]
    assert generate_batch(trained_model, prompts, 10, eos_id=None) == alone
    assert len({tuple(a) for a in alone}) > 4  # the rows really differ


def test_rows_that_reach_end_of_text_early_stop_and_the_others_go_on(trained_model):
    prompts = _prompts([4, 9, 2, 15, 6], seed=3)
    eos = generate(trained_model, prompts[0], 10, eos_id=None)[2]  # row 0 ends after two tokens
    alone = [generate(trained_model, p, 10, eos_id=eos) for p in prompts]
    batched = generate_batch(trained_model, prompts, 10, eos_id=eos)
    assert batched == alone
    assert len(batched[0]) == 2 and max(len(b) for b in batched) == 10  # one row finished early, others ran on


def test_batched_generation_past_the_context_length_matches(trained_model):
    prompts = _prompts([185, 3, 190], seed=4)  # 192-token context: 20 new tokens slide past it
    assert generate_batch(trained_model, prompts, 20, eos_id=None) == \
        [generate(trained_model, p, 20, eos_id=None) for p in prompts]


def test_batched_sampling_is_reproducible_with_a_seed(trained_model):
    settings = SamplingSettings(temperature=1.5, top_k=20, top_p=0.95, repetition_penalty=1.2)
    prompts = _prompts([3, 8, 1], seed=5)
    a = generate_batch(trained_model, prompts, 12, settings, eos_id=None, seed=1)
    assert a == generate_batch(trained_model, prompts, 12, settings, eos_id=None, seed=1)
    assert a != generate_batch(trained_model, prompts, 12, settings, eos_id=None, seed=2)


def test_repetition_penalty_in_a_batch_equals_alone(trained_model):
    settings = SamplingSettings(repetition_penalty=1.5)
    prompts = _prompts([6, 2, 11], seed=6)
    assert generate_batch(trained_model, prompts, 12, settings, eos_id=None) == \
        [generate(trained_model, p, 12, settings, eos_id=None) for p in prompts]


def test_an_empty_prompt_is_refused_by_its_position(trained_model):
    with pytest.raises(ValueError, match="prompt 1 is empty"):
        generate_batch(trained_model, [[1, 2], []], 3)


@pytest.fixture(scope="module")
def model_with_tokenizer(trained_model):
    from gptlib.tokenizer import train_bpe
    tokenizer = train_bpe([" ".join(str(i) for i in range(3000)) + " Repeat the words. apple pear plum."],
                          vocab_size=VOCAB)
    assert tokenizer.vocab_size == VOCAB
    trained_model.tokenizer = tokenizer
    return trained_model


def test_answer_instructions_equals_answer_instruction_in_order(model_with_tokenizer):
    pairs = [("Repeat the words.", "apple pear"), ("Sort them.", ""), ("Repeat.", "plum plum plum apple")]
    alone = [answer_instruction(model_with_tokenizer, i, x, max_new_tokens=6) for i, x in pairs]
    assert answer_instructions(model_with_tokenizer, pairs, max_new_tokens=6, batch_size=2) == alone


def test_cli_eval_answers_in_batches_with_the_same_answers_and_scores_each_task(model_with_tokenizer, tmp_path):
    import json

    from gptlib import save_checkpoint
    from gptlib.cli import main
    from gptlib.tasks import generate_examples, write_jsonl

    save_checkpoint(tmp_path / "m.pth", model_with_tokenizer)
    write_jsonl(generate_examples(3, seed=0), tmp_path / "tasks.jsonl")  # 7 tasks x 3, each row with a "task"
    predictions = {}
    for batch_size in ("1", "64"):
        out = tmp_path / f"pred{batch_size}.jsonl"
        assert main(["eval", "--checkpoint", str(tmp_path / "m.pth"), "--data", str(tmp_path / "tasks.jsonl"),
                     "--max-new-tokens", "8", "--batch-size", batch_size, "--quiet", "--predictions", str(out),
                     "--json"]) == 0
        predictions[batch_size] = [json.loads(line) for line in out.read_text().splitlines()]
    assert [p["prediction"] for p in predictions["1"]] == [p["prediction"] for p in predictions["64"]]
    assert len(predictions["64"]) == 21 and {p["task"] for p in predictions["64"]} == {
        "repeat", "reverse", "capitals", "last_word", "count", "sort", "add"}


def test_eval_json_breaks_the_score_down_by_task(model_with_tokenizer):
    from gptlib import Example
    from gptlib.evaluate import score_answers

    examples = [Example("Repeat.", "a b", "a b", task="repeat"), Example("Count.", "a b", "2", task="count"),
                Example("Count.", "a b c", "3", task="count")]
    scores = score_answers(model_with_tokenizer, examples, max_new_tokens=4, batch_size=2)
    assert scores["by_task"].keys() == {"repeat", "count"} and scores["by_task"]["count"]["examples"] == 2
    assert [p["task"] for p in scores["predictions"]] == ["repeat", "count", "count"]


def test_rows_are_grouped_by_length_to_save_padding():
    from gptlib.generate import _row_groups
    assert _row_groups([1, 1, 2, 50, 50, 52], group_cost=10) == [(0, 3), (3, 6)]
    assert _row_groups([1, 1, 2, 50, 50, 52], group_cost=1000) == [(0, 6)]  # a group costs more than its padding
    assert _row_groups([5], group_cost=10) == [(0, 1)]


def test_prompts_of_very_different_lengths_fill_the_cache_in_groups_and_match_alone(trained_model):
    from gptlib.generate import GROUP_COST, _row_groups
    prompts = _prompts([2, 90, 3, 120, 1, 100, 4, 110], seed=9)
    assert len(_row_groups(sorted(len(p) for p in prompts), GROUP_COST)) > 1  # this test really makes groups
    eos = generate(trained_model, prompts[6], 10, eos_id=None)[3]  # one row ends early: rows leave a grouped cache
    assert generate_batch(trained_model, prompts, 10, eos_id=eos) == \
        [generate(trained_model, p, 10, eos_id=eos) for p in prompts]


def test_prompts_sharing_a_header_compute_it_once_and_match_each_prompt_alone():
    """The shared first tokens are computed for one row and copied; rows run in groups, each padded to its own
    longest row. The logits must equal each prompt run alone, for the prompts and for one more token.

    An untrained model is used on purpose: its logits depend on every earlier token and position, so a wrong
    position or mask after the shared part shows at once.
    """
    from gptlib.generate import GROUP_COST, _prefill, _row_groups
    torch.manual_seed(0)
    model = GPTModel(tiny_config(vocab_size=VOCAB, context_length=128)).eval()
    header = _prompts([9], seed=7)[0]
    tails = sorted(_prompts([1, 5, 3, 8, 70, 80, 75], seed=8), key=len)
    prompts = [header] + [header + tail for tail in tails]  # the first: the header alone
    groups = _row_groups([len(p) - 8 for p in prompts], GROUP_COST)
    assert len(groups) == 2  # short rows and long rows
    with torch.no_grad():
        logits, mask, cache = _prefill(model, prompts)
        for first, end in groups:  # each group: its own padding, then the 8 shared positions
            width = max(len(p) for p in prompts[first:end]) - 8
            start = mask.shape[1] - 8 - width
            assert not mask[first:end, :start].any() and mask[first:end, start:start + 8].all()
        alone = torch.stack([model(torch.tensor([p]))[0, -1] for p in prompts])
        torch.testing.assert_close(logits, alone, atol=1e-5, rtol=1e-4)
        chosen = logits.argmax(-1)  # one more step from the shared cache
        mask = torch.cat([mask, mask.new_ones(len(prompts), 1)], dim=1)
        step = model(chosen[:, None], attention_mask=mask, kv_cache=cache, last_only=True)[:, -1]
        alone = torch.stack([model(torch.tensor([p + [t]]))[0, -1] for p, t in zip(prompts, chosen.tolist())])
        torch.testing.assert_close(step, alone, atol=1e-5, rtol=1e-4)
