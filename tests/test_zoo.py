import pytest

from gpt2_scale import GPT, ModelConfig
from gpt2_scale.zoo import available_models

PUBLISHED = {  # OpenAI GPT-2 checkpoints, tied embeddings, vocab 50257
    "gpt2-124m": 124_439_808,
    "gpt2-350m": 354_823_168,
    "gpt2-774m": 774_030_080,
    "gpt2-1558m": 1_557_611_200,
}


@pytest.mark.parametrize("name,count", PUBLISHED.items())
def test_published_parameter_counts(name, count):
    assert ModelConfig.from_name(name).num_params() == count


def test_counts_from_shapes_match_a_built_model():
    for name in ["gpt2-124m", "gpt2-tiny", "gpt2-mini"]:
        for pad in (False, True):
            cfg = ModelConfig.from_name(name, pad_vocab=pad)
            assert GPT(cfg).num_params() == cfg.num_params()


def test_aliases_resolve_to_the_same_config():
    assert ModelConfig.from_name("gpt2") == ModelConfig.from_name("gpt2-124m")
    assert ModelConfig.from_name("GPT2-XL") == ModelConfig.from_name("gpt2-1558m")
    assert ModelConfig.from_name("gpt2-medium").n_layer == 24


def test_padded_vocab():
    cfg = ModelConfig.from_name("gpt2", pad_vocab=True)
    assert cfg.padded_vocab_size == 50304 and cfg.vocab_size == 50257
    assert cfg.num_params() == 124_475_904


def test_gpt3_family_carries_paper_training_defaults():
    small = ModelConfig.from_name("gpt3-125m")
    assert (small.block_size, small.batch_tokens, small.learning_rate) == (2048, 2**19, 6e-4)
    xl = ModelConfig.from_name("gpt3-1.3b")
    assert (xl.n_layer, xl.n_embd, xl.batch_tokens, xl.learning_rate) == (24, 2048, 2**20, 2e-4)
    for name in ["gpt3-350m", "gpt3-760m", "gpt3-2.7b", "gpt3-6.7b", "gpt3-13b", "gpt3-175b"]:
        assert ModelConfig.from_name(name).learning_rate is not None


def test_unknown_name_lists_valid_names():
    with pytest.raises(ValueError, match="valid names:.*gpt2-124m"):
        ModelConfig.from_name("gpt5")
    assert "gpt2-tiny" in available_models()


def test_bad_shapes_are_rejected():
    with pytest.raises(ValueError, match="divisible"):
        ModelConfig(2, 3, 128)
    with pytest.raises(ValueError, match="n_layer"):
        ModelConfig(0, 4, 128)
