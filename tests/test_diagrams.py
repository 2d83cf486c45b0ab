"""The teaching pictures: drawn from real objects, and the attention weights they show are the model's own."""

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402

from gptlib import GPTModel, InstructionCollator, TrainConfig, train_bpe  # noqa: E402
from gptlib import diagrams  # noqa: E402
from gptlib.data import tokenize_example  # noqa: E402
from gptlib.instructions import Example  # noqa: E402

from conftest import tiny_config  # noqa: E402


@pytest.fixture(scope="module")
def model():
    tokenizer = train_bpe(["But soft, what light through yonder window breaks? It is the east."] * 20, 300)
    torch.manual_seed(0)
    return GPTModel(tiny_config(vocab_size=tokenizer.vocab_size), tokenizer).eval()


def test_attention_weights_are_the_ones_the_model_uses(model):
    """Weights times values, through the output projection, must give the block's attention output."""
    ids = torch.tensor([model.tokenizer.encode("But soft, what light through yonder window")])
    layer = 1
    with torch.no_grad():
        x = model.tok_emb(ids) + model.pos_emb(torch.arange(ids.shape[1]))
        x = model.blocks[0](x)
        block = model.blocks[layer]
        weights = diagrams.attention_weights(model, ids, layer)  # (1, heads, tokens, tokens)
        _, _, v = block.att.qkv(block.norm1(x)).split(model.config.emb_dim, dim=2)
        v = v.view(1, ids.shape[1], model.config.n_heads, -1).transpose(1, 2)
        mixed = (weights @ v).transpose(1, 2).reshape(1, ids.shape[1], -1)
        torch.testing.assert_close(block.att.out_proj(mixed), block.att(block.norm1(x)), atol=1e-5, rtol=1e-4)
    assert torch.allclose(weights.sum(-1), torch.ones(1)) and torch.all(weights.triu(1) == 0)  # rows sum to 1, causal


def test_the_batch_grid_is_drawn_from_a_real_collated_batch(model):
    items = [tokenize_example(Example(i, "", r), model.tokenizer) for i, r in [("Say it.", "But soft."),
                                                                                ("Again.", "What light")]]
    batch = InstructionCollator(64, pad_id=model.tokenizer.eot_id)(items)
    fig = diagrams.draw_batch_grid(batch, model.tokenizer)
    shown = fig.axes[0].images[0].get_array()
    graded = (batch["labels"] != -100) & (batch["attention_mask"] == 1)
    assert (torch.as_tensor(shown) == 1).equal(graded)  # green exactly where a label is graded
    plt.close(fig)


def test_every_diagram_draws(model):
    figures = [diagrams.draw_shifted_targets(model.tokenizer, "But soft, what light"),
               diagrams.draw_transformer_block(), diagrams.draw_gpt(model.config), diagrams.draw_training_loop(),
               diagrams.plot_learning_rate(TrainConfig(lr=1e-3, warmup_steps=10), 100),
               diagrams.plot_attention(model, "But soft, what light", layer=1),
               diagrams.draw_task_evaluation(1000, 100, 4000, (850, 100, 50))]
    for fig in figures:
        assert fig.axes
        plt.close(fig)


def test_token_losses_are_the_model_loss_token_by_token(model):
    """The strips show each answer token's own loss; their mean is the loss evaluate_loss reports for the answer."""
    from gptlib import evaluate_loss, instruction_loader
    from gptlib.evaluate import response_token_losses

    torch.manual_seed(1)
    model = GPTModel(tiny_config(vocab_size=model.tokenizer.vocab_size, context_length=192), model.tokenizer).eval()
    example = Example("Say it.", "", "But soft, what light")
    pieces, losses = response_token_losses(model, example)
    assert "".join(pieces) == "But soft, what light" + model.tokenizer.decode([model.tokenizer.eot_id])
    loader = instruction_loader([example], 1, 192, shuffle=False, tokenizer=model.tokenizer)
    assert sum(losses) / len(losses) == pytest.approx(evaluate_loss(model, loader), rel=1e-5)
    fig = diagrams.draw_token_losses({"an answer": (pieces, losses)})
    assert len(fig.axes[0].patches) == len(pieces)
    plt.close(fig)


def test_the_last_token_picture_marks_what_the_classifier_reads(model):
    from gptlib.classify import ClassificationCollator, last_token_index

    items = [(model.tokenizer.encode(t), label) for t, label in [("But soft", 0), ("what light through yonder", 1)]]
    for side in ("right", "left"):
        batch = ClassificationCollator(64, model.tokenizer.eot_id, padding_side=side)(items)
        fig = diagrams.draw_last_token(batch, model.tokenizer, ["no", "yes"])
        shown = torch.as_tensor(fig.axes[0].images[0].get_array())
        picked = (shown == 2).nonzero()[:, 1]
        assert picked.tolist() == last_token_index(batch["attention_mask"]).tolist()  # all columns shown here
        plt.close(fig)
