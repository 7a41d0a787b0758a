"""Data, checkpoints and every artifact on S3, against a real S3 server (Ceph's radosgw on 127.0.0.1, started by
scripts/s3_server.sh through the session fixture in tests/conftest.py).

Every process here runs with a ``tensorflow_io`` that cannot be imported: s3:// is hvdtrain's own client on every
TensorFlow version, and these tests would fail if any path still went through tensorflow-io.
"""
import json
import os
import re
import tempfile
from pathlib import Path

import numpy as np
import pytest

from tests.helpers import BIN, env, run
from tests.unit.test_data_sources import write_shard

pytestmark = pytest.mark.e2e


NO_IO = Path(tempfile.mkdtemp(prefix="no-tensorflow-io-"))
(NO_IO / "tensorflow_io").mkdir(exist_ok=True)
(NO_IO / "tensorflow_io" / "__init__.py").write_text("raise ImportError('tensorflow-io is not installed')\n")


def s3_env(s3_server, **extra):
    base = env()
    return {**base, **s3_server["env"], "PYTHONPATH": f"{NO_IO}{os.pathsep}{base['PYTHONPATH']}",
            "HVDTRAIN_CACHE": str(NO_IO / "cache"), **extra}


def s3(s3_server, code: str) -> str:
    """Run Python code with hvdtrain.storage against the server; returns its stdout."""
    import subprocess
    import sys

    full = "import os\nfrom hvdtrain import storage\n" + code + "\nimport sys; sys.stdout.flush(); os._exit(0)\n"
    return subprocess.run([sys.executable, "-c", full], capture_output=True, text=True, env=s3_env(s3_server),
                          check=True, timeout=120).stdout


def hvdtrain_2_ranks(s3_server, args, failpoint=None, check=True):
    extra = {"HVDTRAIN_FAILPOINT": failpoint} if failpoint else {}
    cmd = [str(BIN / "horovodrun"), "-np", "2", "-H", "localhost:2", "--gloo", str(BIN / "hvdtrain"), *args]
    return run(cmd, env=s3_env(s3_server, **extra), timeout=600, check=check)


def test_tfrecords_from_a_bucket_outputs_to_the_bucket_killed_then_resumed(s3_server, bucket, tmp_path):
    local = tmp_path / "data"
    local.mkdir()
    for i in range(2):
        write_shard(local / f"train-{i}", [1, 2, 3, 4] * 6, seed=i)
    write_shard(local / "validation-0", [1, 2, 3, 4] * 2)
    s3(s3_server, f"storage.upload({str(local)!r}, {bucket + '/imagenet'!r})")
    out = f"{bucket}/runs/r1"
    args = ["train", "--recipe", "synthetic-resnet-small", "--set", "data.source=tfrecord",
            "--set", f"data.path={bucket}/imagenet", "--set", "data.num_classes=4", "--set", "data.label_offset=-1",
            "--set", "data.image_size=16", "--set", "data.batch_size_per_rank=4", "--set", "data.num_examples=0",
            "--set", "train.epochs=3", "--set", "model.params={blocks_per_stage: 1}", "--output", out]
    killed = hvdtrain_2_ranks(s3_server, args, failpoint="mid-checkpoint@2", check=False)
    assert killed.returncode != 0
    # epoch 2's checkpoint files are in the bucket, its marker is not: an incomplete checkpoint
    listing = json.loads(s3(s3_server, "import json; print(json.dumps(storage.listdir("
                                       f"{out + '/checkpoints/epoch-0002'!r})))"))
    assert "state.json" not in listing and "manifest.json" in listing and any(n.startswith("rank-") for n in listing)
    again = hvdtrain_2_ranks(s3_server, args)
    assert "resuming after epoch 1" in again.stdout
    assert "incomplete checkpoint" in again.stderr and "epoch-0002" in again.stderr
    found = json.loads(s3(s3_server, f"""import json
print(json.dumps({{"top": storage.listdir({out!r}), "ckpt": storage.listdir({out + '/checkpoints'!r}),
    "metrics": storage.read_text({out + '/metrics.jsonl'!r}), "summary": storage.read_text({out + '/summary.json'!r}),
    "tb": storage.glob({out + '/tensorboard/train/*'!r})}}))"""))
    assert {"config.yaml", "metrics.jsonl", "summary.json", "model.keras", "curves.png", "tensorboard",
            "checkpoints"} <= set(found["top"])
    assert found["ckpt"] == ["epoch-0001", "epoch-0002", "epoch-0003"]
    assert [json.loads(line)["epoch"] for line in found["metrics"].splitlines()] == [1, 2, 3]
    summary = json.loads(found["summary"])
    assert summary["world_size"] == 2 and summary["train_examples"] == 48 and summary["test_examples"] == 8
    assert found["tb"]  # TensorBoard event files written straight to the bucket
    # the model in the bucket is an ordinary model: evaluate reads it (and its run's config) from there
    result = run([str(BIN / "hvdtrain"), "evaluate", "--model", out], env=s3_env(s3_server), timeout=300)
    assert json.loads(result.stdout.strip().splitlines()[-1])["accuracy"] == pytest.approx(summary["test_accuracy"])


def test_text_and_npz_sources_read_from_a_bucket_and_a_model_there_generates_compresses_exports(
        s3_server, bucket, tmp_path):
    rng = np.random.default_rng(0)
    y = np.arange(400) % 2
    x = (rng.random((400, 4, 4)) * 0.2 + y[:, None, None] * 0.8).astype(np.float32)
    np.savez(tmp_path / "d.npz", x=x, y=y)
    from hvdtrain.data import text

    (tmp_path / "corpus.txt").write_bytes(text.embedded_corpus()[:20_000])
    s3(s3_server, f"storage.upload({str(tmp_path / 'd.npz')!r}, {bucket + '/d.npz'!r}); "
                  f"storage.upload({str(tmp_path / 'corpus.txt')!r}, {bucket + '/text/corpus.txt'!r})")
    run([str(BIN / "hvdtrain"), "train", "--recipe", "digits-mlp", "--set", "data.source=npz",
         "--set", f"data.path={bucket}/d.npz", "--set", "train.epochs=10", "--output", str(tmp_path / "npz")],
        env=s3_env(s3_server))
    assert json.loads((tmp_path / "npz" / "summary.json").read_text())["test_accuracy"] >= 0.95
    # at tensor=2 with no model.keras: both ranks write their shards to the bucket, then the marker
    hvdtrain_2_ranks(s3_server, ["train", "--recipe", "gpt-tiny", "--set", f"data.path={bucket}/text/*.txt",
                                 "--set", "model.params={num_layers: 1, width: 32, num_heads: 2}",
                                 "--set", "data.context_length=16", "--set", "train.epochs=1",
                                 "--set", "parallel.tensor=2", "--set", "train.save_model=false",
                                 "--output", f"{bucket}/lm"])
    lm = f"{bucket}/lm"
    found = json.loads(s3(s3_server, f"""import json
print(json.dumps([storage.read_text({lm + '/summary.json'!r}), storage.listdir({lm!r}),
                  storage.listdir({lm + '/checkpoints/epoch-0001'!r})]))"""))
    assert json.loads(found[0])["train_examples"] > 1000 and "model.keras" not in found[1]
    assert {"rank-00000.index", "rank-00001.index", "manifest.json", "state.json"} <= set(found[2])
    # generate, compress and export assemble the model from the sharded checkpoint in the bucket; the last two
    # write there
    hvd = str(BIN / "hvdtrain")
    text = run([hvd, "generate", "--model", lm, "--prompt", "The ", "--max-tokens", "8", "--temperature", "0"],
               env=s3_env(s3_server)).stdout
    assert text.startswith("The ") and len(text) > len("The ")
    run([hvd, "compress", "--model", lm, "--method", "ptq-dynamic", "--output", f"{bucket}/small"],
        env=s3_env(s3_server))
    run([hvd, "export", "--model", lm, "--format", "saved_model", "--output", f"{bucket}/export"],
        env=s3_env(s3_server))
    found = json.loads(s3(s3_server, f"""import json
print(json.dumps([storage.listdir({bucket + '/small'!r}), storage.listdir({bucket + '/export/1'!r})]))"""))
    assert {"compression_report.json", "compression_tradeoff.png"} <= set(found[0])
    assert any(name.endswith(".tflite") for name in found[0]) and "saved_model.pb" in found[1]


def test_a_hugging_face_checkpoint_in_a_bucket_is_fine_tuned_at_tensor_2_and_exported_back_to_it(
        s3_server, bucket, tmp_path):
    """model.pretrained as an s3:// prefix (a tied bfloat16 Llama in 4 shards, made by transformers): each rank of
    tensor=2 reads its slices by ranged requests; the first logged validation loss is the checkpoint's own
    (computed here from the local copy); the run goes back to the bucket as a Hugging Face directory, from which
    generate reads it."""
    from hvdtrain import config, data, formats
    from hvdtrain.data import text
    from hvdtrain.exact_metrics import local_sums

    fixture = Path(__file__).resolve().parents[1] / "fixtures" / "hf" / "llama-tied-bf16"
    (tmp_path / "corpus.txt").write_bytes(text.embedded_corpus()[:8_000])
    s3(s3_server, f"storage.upload({str(fixture)!r}, {bucket + '/tied'!r})")
    out = tmp_path / "run"
    hvdtrain_2_ranks(s3_server, ["train", "--recipe", "llama-finetune", "--set", f"model.pretrained={bucket}/tied",
                                 "--set", f"data.path={tmp_path / 'corpus.txt'}", "--set", "data.context_length=16",
                                 "--set", "train.epochs=1", "--set", "parallel.tensor=2", "--output", str(out)])
    first = json.loads((out / "metrics.jsonl").read_text().splitlines()[0])
    cfg = config.load("llama-finetune", overrides=[f"model.pretrained={fixture}", "data.context_length=16",
                                                   f"data.path={tmp_path / 'corpus.txt'}"])
    source = data.load(cfg.data, seed=0, model_name=cfg.model.name)
    loss, _, count = local_sums(formats.load_model(fixture, context_length=16),
                                source.eval_dataset("val", 0, 1, 16, equal=False))
    assert first["epoch"] == 0 and first["val_loss"] == pytest.approx(loss / count, rel=1e-5)
    hvd = str(BIN / "hvdtrain")
    run([hvd, "export", "--model", str(out), "--format", "huggingface", "--dtype", "bfloat16", "--output",
         f"{bucket}/hf"], env=s3_env(s3_server))
    found = json.loads(s3(s3_server, f"import json; print(json.dumps(storage.listdir({bucket + '/hf'!r})))"))
    assert {"config.json", "model.safetensors", "tokenizer.json", "generation_config.json"} <= set(found)
    generated = run([hvd, "generate", "--model", f"{bucket}/hf", "--prompt", "The ", "--max-tokens", "8",
                     "--temperature", "0"], env=s3_env(s3_server)).stdout
    assert generated.startswith("The ")


def test_a_corpus_prepared_into_a_bucket_is_trained_on_by_steps_killed_and_resumed_there(s3_server, bucket,
                                                                                         tmp_path):
    """`hvdtrain data prepare` from files in a bucket into the bucket; a 2-rank run counted in steps reads its
    windows by ranged requests, writes its checkpoints there, is SIGKILLed as its step-20 checkpoint appears, and
    resumes from the bucket to every metric of the same run on a local copy of the shards, never interrupted."""
    from tests.e2e.test_corpus import STEPS, corpus_files, prepare_command

    local = corpus_files(tmp_path / "in", 0.5)
    s3(s3_server, f"storage.upload({str(local)!r}, {bucket + '/raw'!r})")
    shards = f"{bucket}/tokens"
    command = prepare_command(f"{bucket}/raw", shards)
    run(command, env=s3_env(s3_server))
    s3(s3_server, f"storage.download({shards!r}, {str(tmp_path / 'tokens')!r})")
    assert (tmp_path / "tokens" / "manifest.json").exists() and (tmp_path / "tokens" / "segments").is_dir()

    def args(data, out):
        return ["train", "--recipe", "llama-tiny", "--set", "data.source=tokens", "--set", f"data.path={data}",
                *(a for s in STEPS for a in ("--set", s)), "--output", out]

    reference = tmp_path / "reference"
    hvdtrain_2_ranks(s3_server, args(tmp_path / "tokens", reference))
    out = f"{bucket}/run"
    killed = hvdtrain_2_ranks(s3_server, args(shards, out), failpoint="after-checkpoint@20", check=False)
    assert killed.returncode != 0
    again = hvdtrain_2_ranks(s3_server, args(shards, out))
    assert "resuming after step 20" in again.stdout
    got = [json.loads(line) for line in s3(s3_server, f"print(storage.read_text({out + '/metrics.jsonl'!r}))")
           .strip().splitlines()]
    want = [json.loads(line) for line in (reference / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in got] == [10, 20, 30]
    for g, w in zip(got, want):
        for key in ("loss", "val_loss", "lr"):
            assert g[key] == pytest.approx(w[key], rel=1e-5), (g["step"], key)


@pytest.mark.parametrize("case, message", [
    ("missing bucket", "bucket 'no-such-bucket' does not exist at http://127.0.0.1:"),
    ("wrong credentials", "refused access to bucket"),
    ("unreachable endpoint", "cannot reach the S3 endpoint http://127.0.0.1:1"),
    ("hdfs without tensorflow-io", "needs tensorflow-io for hdfs:// URIs, which exists for TensorFlow 2.15 only: "
                                   "the tf2.15 stack (HVDTRAIN_STACK=tf2.15 HVDTRAIN_EXTRAS=hdfs make setup"),
])
def test_object_storage_errors_are_one_line_and_write_nothing(s3_server, bucket, tmp_path, case, message):
    overrides = {}
    output = f"{bucket}/run"
    if case == "missing bucket":
        output = "s3://no-such-bucket/run"
    elif case == "wrong credentials":
        overrides["AWS_SECRET_ACCESS_KEY"] = "wrong"
    elif case == "unreachable endpoint":
        overrides["S3_ENDPOINT"] = "http://127.0.0.1:1"
    else:  # s3_env's tensorflow_io cannot be imported, as on a machine without the extra
        output = "hdfs://namenode:8020/run"
    proc = run([str(BIN / "hvdtrain"), "train", "--recipe", "digits-mlp", "--set", "train.epochs=1",
                "--output", output], env=s3_env(s3_server, **overrides), check=False, timeout=300)
    assert proc.returncode in (1, 2), proc.stderr
    lines = [ln for ln in proc.stderr.strip().splitlines() if not re.match(r"^\d{4}-\d\d-\d\d \d", ln)]
    assert len(lines) == 1 and message in lines[0] and output in lines[0], proc.stderr
    assert "run" not in s3(s3_server, f"print(storage.listdir({bucket!r}))")  # nothing written


def test_s3_client_lists_in_pages_globs_uploads_in_parts_and_caches_downloads(s3_server, bucket, tmp_path):
    """hvdtrain.s3 and storage's s3:// paths at the edges a training run rarely reaches: listings longer than a
    page, glob patterns, a multipart upload, the download cache, and missing objects and buckets."""
    out = json.loads(s3(s3_server, f"""import hashlib, json
from pathlib import Path
from hvdtrain import s3
b = {bucket!r}
s3.LIST_PAGE = 2  # every listing below takes several pages
s3.PART_BYTES = 5 * 1024 * 1024  # S3's smallest part
for i in range(5):
    storage.write_bytes(f"{{b}}/a/d{{i}}/f.bin", bytes([i]) * (i + 1))
storage.write_text(b + "/a/x.txt", "hello")
big = Path({str(tmp_path / 'big.bin')!r})
big.write_bytes(hashlib.sha256(b"seed").digest() * (11 * 1024 * 1024 // 32 + 3))
storage.upload(big, b + "/big.bin")
storage.download(b + "/big.bin", big.with_name("back.bin"))
first = storage.local_copy(b + "/big.bin")
stamp = Path(first).stat().st_mtime_ns
again = storage.local_copy(b + "/big.bin")
result = {{"listdir": storage.listdir(b + "/a"), "dirs": storage.glob(b + "/a/d*"),
    "files": storage.glob(b + "/a/d[13]/*.bin"), "txt": storage.glob(b + "/a/*.txt"),
    "is_dir": [storage.is_dir(b + "/a"), storage.is_dir(b + "/a/x.txt"), storage.is_dir(b)],
    "exists": [storage.exists(b + "/a/x.txt"), storage.exists(b + "/a"), storage.exists(b + "/nope"),
               storage.exists("s3://no-such-bucket-here/k")],
    "roundtrip": big.with_name("back.bin").read_bytes() == big.read_bytes(),
    "size": storage.size(b + "/big.bin") == big.stat().st_size,
    "cached": [first == again, Path(first).stat().st_mtime_ns == stamp, Path(first).read_bytes() == big.read_bytes()]}}
storage.remove(b + "/a")
result["after_remove"] = storage.listdir(b)
try:
    storage.read_bytes(b + "/missing")
except FileNotFoundError as exc:
    result["missing"] = str(exc)
print(json.dumps(result))""").strip().splitlines()[-1])
    b = bucket
    assert out["listdir"] == ["d0", "d1", "d2", "d3", "d4", "x.txt"]
    assert out["dirs"] == [f"{b}/a/d{i}" for i in range(5)]
    assert out["files"] == [f"{b}/a/d1/f.bin", f"{b}/a/d3/f.bin"] and out["txt"] == [f"{b}/a/x.txt"]
    assert out["is_dir"] == [True, False, True] and out["exists"] == [True, True, False, False]
    assert out["roundtrip"] and out["size"] and out["cached"] == [True, True, True]
    assert out["after_remove"] == ["big.bin"]
    assert out["missing"] == f"read {b}/missing: HTTP 404 NoSuchKey"
