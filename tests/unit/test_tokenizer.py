"""The tokenizers of language models: bytes and a byte-level BPE (Hugging Face tokenizers), in Python and in the
graph, and what the text source and its metrics make of them."""
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from hvdtrain import config
from hvdtrain.data import text
from hvdtrain.data import tokenizer as T
from hvdtrain.errors import ConfigError, DataError

ROOT = Path(__file__).resolve().parents[2]
CORPUS = text.embedded_corpus()


@pytest.fixture(scope="module")
def bpe():
    return T.BPE.train(CORPUS[:60_000], 600)


def test_bpe_is_deterministic_round_trips_and_compresses(bpe):
    again = T.BPE.train(CORPUS[:60_000], 600)
    assert again.to_json() == bpe.to_json()  # every rank trains the same merges from the same text
    sample = CORPUS[100_000:104_000].decode("utf-8", errors="replace")
    ids = bpe.encode(sample)
    assert bpe.decode(ids) == sample and max(ids) < bpe.vocab_size == 600
    assert len(sample.encode()) / len(ids) > 2.0  # fewer tokens than bytes
    odd = "naïve café — ünïcödé 😀\n\t  "
    assert bpe.decode(bpe.encode(odd)) == odd  # byte-level: nothing is unknown


def test_the_graph_encodes_and_decodes_as_tokenizers_does(bpe):
    import tensorflow as tf

    graph = T.InGraph(bpe)
    encode = tf.function(graph.encode, input_signature=[tf.TensorSpec([], tf.string)])
    for sample in (CORPUS[200_000:200_600], "aaaa aaaa  \n\n\n".encode(), "ünï 😀".encode(), b"", b"x"):
        expected = bpe.encode(sample)
        assert encode(tf.constant(sample)).numpy().tolist() == expected, sample
        assert graph.decode(tf.constant(expected, tf.int32)).numpy() == sample
    plain = T.InGraph(T.Bytes())
    assert plain.encode(tf.constant("hé")).numpy().tolist() == list("hé".encode())


def test_the_text_source_counts_bytes_per_token_and_bits_per_byte_use_them(tmp_path):
    from hvdtrain.exact_metrics import metrics_from_sums

    (tmp_path / "c.txt").write_bytes(CORPUS[:80_000])
    source = text.load(str(tmp_path / "c.txt"), 32, 0.1, 0.1, "bpe", 512)
    assert source.num_classes == 512 and source.x_train.max() < 512
    ratio = source.bytes_of_token("test")
    assert 1.5 < ratio < 6.0  # 512 tokens learnt from 64 KB: about 2 bytes each
    nats = 3.0
    bits = metrics_from_sums([nats * 100, 10, 100], True, ratio)["bits_per_byte"]
    assert bits == pytest.approx(nats / math.log(2) / ratio)
    plain = text.load(str(tmp_path / "c.txt"), 32, 0.1, 0.1)
    assert plain.num_classes == 256 and plain.bytes_of_token("test") == 1.0
    assert len(plain.x_train) > 2 * len(source.x_train)  # the same text in fewer windows of tokens


def test_tokenizer_errors_are_one_line(tmp_path):
    with pytest.raises(ConfigError, match="needs data.vocab_size above the 256"):
        config.load("llama-tiny", overrides=["data.vocab_size=100"])
    with pytest.raises(ConfigError, match="needs data.source=text"):
        config.load("digits-cnn", overrides=["data.tokenizer=bpe", "data.vocab_size=512"])
    with pytest.raises(DataError, match="not 'bytes', 'bpe' or an existing tokenizer.json"):
        T.make(str(tmp_path / "missing.json"))
    (tmp_path / "bad.json").write_text("{not json")
    with pytest.raises(DataError, match="is not a tokenizer.json"):
        T.make(str(tmp_path / "bad.json"))


def test_a_saved_tokenizer_is_found_beside_a_model_or_a_checkpoint(tmp_path, bpe):
    run = tmp_path / "run"
    (run / "checkpoints" / "epoch-0001").mkdir(parents=True)
    assert isinstance(T.load_beside(str(run)), T.Bytes)
    (run / T.FILE).write_text(bpe.to_json())
    for where in (run, run / "model.keras", run / "checkpoints" / "epoch-0001"):
        assert T.load_beside(str(where)).to_json() == bpe.to_json()
    with pytest.raises(DataError, match="has 256 output classes but its tokenizer has 600"):
        T.check_vocabulary(bpe, 256, "the model")


def test_every_family_loads_after_import_models_in_a_fresh_process(tmp_path):
    """Custom layers are registered where they are defined: ``import models`` is all ``load_model`` needs."""
    import models

    for family in models.language_models():
        model = models.build(family, input_shape=(8,), num_classes=300, num_layers=1, width=16, num_heads=2)
        model.save(tmp_path / f"{family}.keras")
        x = np.arange(16, dtype=np.int32).reshape(2, 8)
        np.save(tmp_path / f"{family}.npy", model(x).numpy())
    code = ("import sys, numpy as np, models, tensorflow as tf\n"
            "for f in sys.argv[1:]:\n"
            "    m = tf.keras.models.load_model(f + '.keras')\n"
            "    x = np.arange(16, dtype=np.int32).reshape(2, 8)\n"
            "    assert np.allclose(m(x).numpy(), np.load(f + '.npy'), atol=1e-6), f\n"
            "print('loaded', len(sys.argv) - 1)")
    out = subprocess.run([sys.executable, "-c", code, *(str(tmp_path / f) for f in models.language_models())],
                         capture_output=True, text=True, cwd=ROOT, env={"TF_CPP_MIN_LOG_LEVEL": "2",
                                                                       "PATH": "/usr/bin:/bin"})
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.split() == ["loaded", str(len(models.language_models()))]
