import pytest

from gptlib import GPTConfig, GPTModel, preset

GPT_CONFIG_124M = {"vocab_size": 50257, "context_length": 256, "emb_dim": 256, "n_heads": 4,
                   "n_layers": 12, "drop_rate": 0.1, "qkv_bias": False}


def test_seed_guide_dict_is_accepted_verbatim():
    config = GPTConfig(**GPT_CONFIG_124M)
    assert config.emb_dim == 256 and config.head_dim == 64 and not config.tie_weights
    assert preset("seed-small").to_dict() == {**GPT_CONFIG_124M, "tie_weights": False}


def test_gpt2_124m_preset_has_gpt2_parameter_count():
    with __import__("torch").device("meta"):
        model = GPTModel(preset("gpt2-124m"))
    assert model.num_parameters() == 124_439_808  # GPT-2 small, head tied to the embedding


@pytest.mark.parametrize("bad, message", [
    (dict(emb_dim=30, n_heads=4), "divisible"),
    (dict(n_layers=0), "n_layers"),
    (dict(drop_rate=1.5), "drop_rate"),
])
def test_bad_values_are_refused_with_the_field_name(bad, message):
    with pytest.raises(ValueError, match=message):
        GPTConfig(**{**GPT_CONFIG_124M, **bad})


def test_unknown_keys_and_presets_are_named():
    with pytest.raises(ValueError, match="emb_size"):
        GPTConfig.from_dict({**GPT_CONFIG_124M, "emb_size": 3})
    with pytest.raises(ValueError, match="tiny"):
        preset("huge")
