"""`hvdtrain compress` and `hvdtrain evaluate` end to end on a small digits CNN, and at 2 ranks."""
import json

import numpy as np
import pytest

from tests.helpers import BIN, run, run_parallel

pytestmark = pytest.mark.e2e


@pytest.fixture(scope="module")
def trained(demo_run):
    """The model to compress (and the teacher to distill): the README's main job, digits-cnn trained 60 epochs at 2
    ranks (tests/conftest.py; shared with the train CLI's tests, trained once per test session)."""
    return demo_run[0]


def compress(trained, tmp_path, method, *sets):
    out = tmp_path / method
    args = [a for s in ("compression.latency_rounds=2", "compression.latency_calls=5", *sets) for a in ("--set", s)]
    run([str(BIN / "hvdtrain"), "compress", "--model", str(trained), "--method", method, "--output", str(out),
         *args], timeout=900)
    report = json.loads((out / "compression_report.json").read_text())
    assert (out / "compression_tradeoff.png").read_bytes()[:4] == b"\x89PNG"
    return out, {a["artifact"]: a for a in report["artifacts"]}, report


@pytest.fixture(scope="module")
def post_training(trained, tmp_path_factory):
    """The three post-training modes side by side in one run and one report (one comma-separated --method); int8
    with integer input and output, as integer-only accelerators take it (int8 with float input and output: the
    pipeline's, below)."""
    return compress(trained, tmp_path_factory.mktemp("ptq"), "ptq-int8,ptq-dynamic,ptq-fp16",
                    "compression.int8_io=true")


def test_ptq_int8_is_really_int8_smaller_and_as_accurate_with_integer_io(post_training):
    out, arts, report = post_training
    assert report["methods"] == ["ptq-int8", "ptq-dynamic", "ptq-fp16"]
    assert [a for a in arts] == ["float32", "float32-tflite", "float32-ptq-int8", "float32-ptq-dynamic",
                                 "float32-ptq-fp16"]  # the float32 baseline once, then each method's artifact
    ref, f32, int8 = arts["float32"], arts["float32-tflite"], arts["float32-ptq-int8"]
    assert f32["value"] == pytest.approx(ref["value"], abs=0.003)  # TFLite float32 matches Keras
    assert f32["size_kb"] / int8["size_kb"] >= 3.5
    assert int8["value"] >= ref["value"] - 0.02
    from hvdtrain.serving.tflite import TFLiteModel

    model = TFLiteModel(out / "float32-ptq-int8.tflite")
    types = model.tensor_types()
    assert types.count("int8") > types.count("float32")  # weights and activations really int8
    assert model.input["dtype"] == np.int8 and model.output["dtype"] == np.int8


@pytest.mark.parametrize("name", ["float32-ptq-dynamic", "float32-ptq-fp16"])
def test_other_post_training_modes(post_training, name):
    _, arts, _ = post_training
    assert arts[name]["size_kb"] < arts["float32-tflite"]["size_kb"] / 1.8
    assert arts[name]["value"] >= arts["float32"]["value"] - 0.01


def test_prune_reaches_the_target_in_every_layer(trained, tmp_path):
    # 6 epochs of fine-tuning, not the default 20: the schedule reaches 80% by its end either way, and accuracy is
    # then 0.6 points below the dense model's (measured; the test allows 3)
    _, arts, _ = compress(trained, tmp_path, "prune", "compression.fine_tune_epochs=6")
    pruned = arts["pruned"]
    sizes = {"conv_0": 288, "conv_1": 18432, "dense": 131072, "logits": 1280}
    for layer, sparsity in pruned["notes"]["pruned_layers"].items():
        assert sparsity >= 0.8 - 1 / sizes[layer], layer  # 80% up to one weight of rounding
    assert pruned["nonzero"] < 0.25 * pruned["params"]
    assert arts["pruned-float32"]["gzip_ratio"] >= 3.0
    assert pruned["value"] >= arts["float32"]["value"] - 0.03


def test_qat_exports_int8_and_structured_2_4_pruning(trained, tmp_path):
    """Two training-based methods side by side, each fine-tuned from the trained model for one epoch."""
    out, arts, _ = compress(trained, tmp_path, "qat,prune", "compression.fine_tune_epochs=1",
                            "compression.structured_2_4=true")
    assert arts["qat-int8"]["size_ratio"] >= 3.5
    assert arts["qat-int8"]["value"] >= arts["float32"]["value"] - 0.02
    from hvdtrain.compression.prune import is_2_4_sparse

    import tensorflow as tf

    model = tf.keras.models.load_model(out / "pruned.keras")
    assert is_2_4_sparse(model.get_layer("dense").get_weights()[0])
    assert not is_2_4_sparse(tf.keras.models.load_model(trained / "model.keras").get_layer("dense").get_weights()[0])


def test_distilled_student_beats_the_same_student_without_teacher(trained, tmp_path):
    """The issue's target at the shipped defaults: a >= 4x smaller student, 5 seeds, same epochs and seeds."""
    _, arts, report = compress(trained, tmp_path, "distill")
    d = report["distillation"]
    assert d["teacher_params"] >= 4 * d["student_params"]  # 9.8x fewer
    assert len(d["distilled"]) == len(d["without_teacher"]) == 5
    assert d["distilled_mean"] > d["without_teacher_mean"]  # measured 0.9816 vs 0.9783 at 2 ranks
    assert d["seeds_won"] >= 3
    assert arts["student"]["params"] == d["student_params"]
    assert arts["student-float32"]["value"] == pytest.approx(arts["student"]["value"], abs=0.003)


def test_pipeline_distills_prunes_and_quantizes(trained, tmp_path):
    out, arts, report = compress(trained, tmp_path, "pipeline", "compression.distill_epochs=10",
                               "compression.baseline_seeds=1", "compression.fine_tune_epochs=3")
    assert [a for a in arts] == ["float32", "float32-tflite", "student", "student-float32", "student-pruned",
                                 "student-pruned-float32", "pipeline-int8"]
    final = arts["pipeline-int8"]
    assert final["size_ratio"] >= 8  # against the float32 Keras model
    pruned = arts["student-pruned"]["notes"]["pruned_layers"]
    assert all(v >= 0.49 for v in pruned.values())  # compression.pipeline_sparsity=0.5
    assert arts["student-pruned"]["notes"]["fine_tuned_with"] == "distillation"
    assert final["value"] >= arts["float32"]["value"] - 0.04  # shorter than the defaults; docs give the full run
    from hvdtrain.serving.tflite import TFLiteModel

    int8 = TFLiteModel(out / "pipeline-int8.tflite")  # int8 inside, float input and output (the default)
    assert int8.input["dtype"] == np.float32 and "int8" in int8.tensor_types()


def test_evaluate_keras_and_tflite(trained, post_training):
    out, arts, _ = post_training
    for path, key in ((trained / "model.keras", "float32"),
                      (out / "float32-ptq-dynamic.tflite", "float32-ptq-dynamic")):
        proc = run([str(BIN / "hvdtrain"), "evaluate", "--model", str(path)])
        result = json.loads(proc.stdout.strip().splitlines()[-1])
        assert result["accuracy"] == pytest.approx(arts[key]["value"], abs=1e-6)


def test_gpt_ptq_dynamic_works_and_qat_names_the_unsupported_layers(tmp_path):
    import models
    from hvdtrain import config

    run_dir = tmp_path / "gpt"
    run_dir.mkdir()
    cfg = config.load("gpt-tiny", overrides=["data.context_length=16", "model.params={width: 16, num_heads: 2}"])
    (run_dir / "config.yaml").write_text(config.to_yaml(cfg))
    models.build("gpt", input_shape=(16,), num_classes=256, width=16, num_heads=2).save(run_dir / "model.keras")
    _, arts, report = compress(run_dir, tmp_path, "ptq-dynamic")
    assert report["metric"] == "bits_per_byte"
    assert arts["float32-ptq-dynamic"]["value"] == pytest.approx(arts["float32"]["value"], abs=0.05)
    proc = run([str(BIN / "hvdtrain"), "compress", "--model", str(run_dir), "--method", "qat", "--output",
                str(tmp_path / "qat")], check=False)
    assert proc.returncode == 1
    assert "does not support these layers of 'gpt'" in proc.stderr and "block_0 (TransformerBlock)" in proc.stderr


def test_compress_errors(trained, tmp_path):
    proc = run([str(BIN / "hvdtrain"), "compress", "--model", str(trained), "--method", "prun", "--output",
                str(tmp_path / "x")], check=False)
    assert proc.returncode == 2 and "did you mean 'prune'" in proc.stderr
    for methods, message in (("ptq-int8,prun", "did you mean 'prune'"), ("qat,qat", "names a method twice"),
                             ("distill,pipeline", "both train the student")):
        proc = run([str(BIN / "hvdtrain"), "compress", "--model", str(trained), "--method", methods, "--output",
                    str(tmp_path / "x")], check=False)
        assert proc.returncode == 2 and message in proc.stderr and len(proc.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "x").exists()
    tflite = tmp_path / "m.tflite"
    tflite.write_bytes(b"TFL3")
    proc = run([str(BIN / "hvdtrain"), "compress", "--model", str(tflite), "--method", "prune", "--recipe",
                "digits-cnn", "--output", str(tmp_path / "y")], check=False)
    assert proc.returncode == 1 and "is a TFLite model" in proc.stderr
    assert not (tmp_path / "y").exists()


@pytest.mark.parallel
def test_pruning_and_distillation_at_two_ranks(trained, tmp_path):
    r0, r1 = run_parallel("compression_ranks.py", tmp_path, str(trained / "model.keras"))
    np.testing.assert_array_equal(r0["pruned"], r1["pruned"])  # masks and weights identical on both ranks
    assert r0["sparsity"] == r1["sparsity"]
    np.testing.assert_array_equal(r0["student"], r1["student"])  # the student too
    assert r0["teacher_changed"] == r1["teacher_changed"] == 0.0  # and the teacher untouched
