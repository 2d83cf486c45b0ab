import torch
import torch.nn.functional as F

from gptlib import GPTModel, KVCache
from gptlib.model import IGNORE_INDEX

from conftest import tiny_config


def test_logits_shape_and_causality(tiny_model):
    ids = torch.randint(0, 50257, (2, 10))
    logits = tiny_model(ids)
    assert logits.shape == (2, 10, 50257)  # (batch, tokens, vocab)
    changed = ids.clone()
    changed[:, 6:] = 7  # changing later tokens must not change earlier logits
    assert torch.allclose(tiny_model(changed)[:, :6], logits[:, :6], atol=1e-5)
    assert not torch.allclose(tiny_model(changed)[:, 6:], logits[:, 6:], atol=1e-3)


def test_loss_only_at_labels_equals_full_cross_entropy(tiny_model):
    ids = torch.randint(0, 50257, (2, 9))
    labels = torch.randint(0, 50257, (2, 9))
    labels[0, :4] = IGNORE_INDEX
    labels[1, 7:] = IGNORE_INDEX
    full = F.cross_entropy(tiny_model(ids).flatten(0, 1), labels.flatten(), ignore_index=IGNORE_INDEX)
    assert torch.allclose(tiny_model.loss(ids, labels), full, atol=1e-5)


def test_left_padding_with_attention_mask_matches_unpadded(tiny_model):
    ids = torch.randint(0, 50257, (1, 6))
    padded = torch.cat([torch.full((1, 3), 50256), ids], dim=1)
    mask = torch.tensor([[0, 0, 0, 1, 1, 1, 1, 1, 1]])
    out = tiny_model(padded, attention_mask=mask)
    assert torch.isfinite(out).all()
    assert torch.allclose(out[:, 3:], tiny_model(ids), atol=1e-5)


def test_right_padding_needs_no_mask(tiny_model):
    ids = torch.randint(0, 50257, (1, 5))
    padded = torch.cat([ids, torch.full((1, 3), 50256)], dim=1)
    mask = torch.tensor([[1] * 5 + [0] * 3])
    assert torch.allclose(tiny_model(padded, attention_mask=mask)[:, :5], tiny_model(ids), atol=1e-5)


def test_kv_cache_gives_the_same_logits_as_full_recompute(tiny_model):
    ids = torch.randint(0, 50257, (2, 12))
    cache = KVCache(tiny_model.config, batch_size=2)
    first = tiny_model(ids[:, :7], kv_cache=cache)
    second = tiny_model(ids[:, 7:9], kv_cache=cache)  # two tokens at once on top of the cache
    third = tiny_model(ids[:, 9:10], kv_cache=cache)
    full = tiny_model(ids[:, :10])
    assert cache.length == 10
    assert torch.allclose(torch.cat([first, second, third], 1), full, atol=1e-5)


def test_tied_head_shares_the_embedding():
    model = GPTModel(tiny_config(tie_weights=True))
    untied = GPTModel(tiny_config())
    assert model.out_head.weight is model.tok_emb.weight
    assert untied.num_parameters() - model.num_parameters() == 50257 * 32


def test_too_long_input_is_refused_with_the_lengths(tiny_model):
    import pytest
    with pytest.raises(ValueError, match="33 tokens.*context_length \\(32\\)"):
        tiny_model(torch.zeros(1, 33, dtype=torch.long))


def test_dropout_only_in_training_mode():
    torch.manual_seed(0)
    model = GPTModel(tiny_config(drop_rate=0.5))
    ids = torch.randint(0, 50257, (1, 8))
    model.eval()
    assert torch.equal(model(ids), model(ids))
    model.train()
    assert not torch.equal(model(ids), model(ids))
