import pytest

from hvdtrain import config
from hvdtrain.errors import ConfigError


def test_every_recipe_loads():
    names = config.recipe_names()
    assert "digits-cnn" in names and "digits-mlp" in names
    for name in names:
        raw = config.load_recipe_dict(name)
        needs_path = raw["data"]["source"] in ("tfrecord", "npz") and not raw["data"].get("path")
        if needs_path:  # recipes for users' data name the key to set
            with pytest.raises(ConfigError, match="needs data.path"):
                config.load(name)
        cfg = config.load(name, overrides=["data.path=/data/x"] if needs_path else [])
        assert cfg.train.epochs >= 1


def test_overrides_are_typed_and_applied():
    cfg = config.load("digits-cnn", overrides=["train.epochs=3", "train.learning_rate=0.01",
                                               "model.params.filters=[8, 16]", "train.schedule=step"])
    assert cfg.train.epochs == 3 and cfg.train.learning_rate == 0.01
    assert cfg.model.params["filters"] == [8, 16]
    assert cfg.train.schedule == "step"


def test_scientific_notation_without_a_dot_is_a_number():
    assert config.load("digits-cnn", overrides=["train.learning_rate=1e-3"]).train.learning_rate == 0.001


def test_config_is_frozen():
    cfg = config.load("digits-cnn")
    import dataclasses

    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.train.epochs = 5


@pytest.mark.parametrize("override, words", [
    ("train.epoch=3", ["'train.epoch'", "did you mean 'train.epochs'"]),
    ("trian.epochs=3", ["'trian'", "did you mean 'train'"]),
    ("data.batch_size=8", ["'data.batch_size'", "did you mean 'data.batch_size_per_rank'"]),
    ("train.epochs=three", ["train.epochs", "expected an integer", "three"]),
    ("train.optimizer=adamm", ["train.optimizer", "did you mean 'adam'"]),
    ("train.jit_compile=3", ["train.jit_compile", "true or false"]),
    ("train.epochs=0", ["train.epochs must be at least 1"]),
    ("train.epochs", ["section.key=value"]),
    ("parallel.buckets_per_unit=-1", ["parallel.buckets_per_unit=-1", "1 or more", "0 to cut by size"]),
    ("parallel.buckets_per_unit=2", ["parallel.buckets_per_unit", "parallel.shard_params=true"]),
    ("parallel.shard_degree=2", ["parallel.shard_degree", "parallel.shard_params=true"]),
    ("parallel.shard_degree=-1", ["parallel.shard_degree=-1", "0 for all of them"]),
])
def test_strict_errors_name_the_key(override, words):
    with pytest.raises(ConfigError) as info:
        config.load("digits-cnn", overrides=[override])
    for w in words:
        assert w in str(info.value)
    assert "\n" not in str(info.value)


def test_unknown_recipe_suggests_the_closest():
    with pytest.raises(ConfigError, match="did you mean 'digits-cnn'"):
        config.load("digit-cnn")


def test_resolved_config_round_trips(tmp_path):
    cfg = config.load("digits-mlp", overrides=["train.epochs=2"])
    path = tmp_path / "config.yaml"
    path.write_text(config.to_yaml(cfg))
    assert config.load(config_file=str(path)) == cfg


def test_config_file_errors(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        config.load(config_file=str(tmp_path / "missing.yaml"))
    bad = tmp_path / "bad.yaml"
    bad.write_text("train: [unclosed\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        config.load(config_file=str(bad))
    code = tmp_path / "code.yaml"
    code.write_text("train: !!python/object/apply:os.system ['echo pwned']\n")
    with pytest.raises(ConfigError):  # yaml.safe_load: configs are data, never code
        config.load(config_file=str(code))


def test_tensor_layouts_get_a_short_horovod_cycle_under_mpi_unless_one_is_given(monkeypatch):
    """Tensor layouts wait on a small collective per block: under MPI hvdtrain shortens Horovod's cycle time for
    them (measured: a dependent 1 KB allreduce from 2.07 ms to 0.125 ms); under Gloo (no faster at any cycle), for
    data parallelism and for pipelines (whose receives, pending all step, kept the short-cycled background threads
    negotiating and slowed the stages' compute) Horovod's default stays, and a cycle time the user gives is kept."""
    from hvdtrain import runtime
    from hvdtrain.distributed import horovod_environment

    def cycle(*overrides):
        knobs = runtime.horovod_knobs(config.load("gpt-tiny", overrides=list(overrides)))
        return horovod_environment(knobs).get("HOROVOD_CYCLE_TIME")

    monkeypatch.delenv("HOROVOD_CONTROLLER", raising=False)
    monkeypatch.setenv("OMPI_COMM_WORLD_RANK", "0")  # a rank that mpirun started
    assert cycle("parallel.tensor=2") == "0.001" and cycle("parallel.shard_params=true") == "0.001"
    assert cycle() is None and cycle("parallel.shard_optimizer=true") is None
    assert cycle("parallel.pipeline=2") is None and cycle("parallel.tensor=2", "parallel.pipeline=2") is None
    assert cycle("parallel.tensor=2", "distributed.cycle_time_ms=0.5") == "0.5"
    monkeypatch.setenv("HOROVOD_CONTROLLER", "gloo")  # horovodrun --gloo, Ray
    assert cycle("parallel.tensor=2") is None


def test_layouts_that_average_their_own_gradients_get_a_small_fusion_threshold_unless_one_is_given():
    """Horovod keeps a 64 MB fusion buffer per process set once two of its tensors fuse; a bucket or a large weight's
    gradient only gets copied into it (measured: 45-50 MB per rank at data=2 x tensor=2, docs/performance.md). Plain
    data parallelism keeps Horovod's default: its DistributedOptimizer fuses many gradients into few allreduces."""
    from hvdtrain import runtime
    from hvdtrain.distributed import horovod_environment

    def fusion(*overrides):
        knobs = runtime.horovod_knobs(config.load("gpt-tiny", overrides=list(overrides)))
        return horovod_environment(knobs).get("HOROVOD_FUSION_THRESHOLD")

    one_mb = str(1024 * 1024)
    assert fusion("parallel.shard_params=true") == one_mb
    assert fusion("parallel.tensor=2") == one_mb and fusion("parallel.pipeline=2") == one_mb
    assert fusion() is None and fusion("parallel.shard_optimizer=true") is None
    assert fusion("parallel.shard_params=true", "distributed.fusion_threshold_mb=32") == str(32 * 1024 * 1024)
    assert fusion("parallel.tensor=2", "distributed.fusion_threshold_mb=64") == str(64 * 1024 * 1024)


@pytest.mark.parametrize("setting", ["distributed.reduce_op=sum", "distributed.grad_compression=fp16",
                                     "distributed.backward_passes_per_step=2"])
def test_parallel_layouts_refuse_the_data_parallel_optimizers_settings(setting):
    """They configure Horovod's DistributedOptimizer, which tensor, pipeline, recompute and ZeRO layouts do not use:
    ignored, a run would silently average where it was asked to sum (a negative control found it)."""
    assert config.load("gpt-tiny", overrides=[setting]).distributed  # data parallelism takes them
    for layout in ("parallel.tensor=2", "parallel.recompute=true", "parallel.shard_optimizer=true"):
        with pytest.raises(ConfigError, match="parallel layouts average gradients themselves"):
            config.load("gpt-tiny", overrides=[setting, layout])


def test_sequence_parallelism_needs_a_tensor_group_that_divides_the_positions():
    assert config.load("gpt-tiny", overrides=["parallel.tensor=2", "parallel.sequence=true"]).parallel.sequence
    with pytest.raises(ConfigError, match="needs parallel.tensor > 1"):
        config.load("gpt-tiny", overrides=["parallel.sequence=true"])
    with pytest.raises(ConfigError, match=r"parallel.tensor=2 must divide data.context_length .*=63"):
        config.load("gpt-tiny", overrides=["parallel.tensor=2", "parallel.sequence=true", "data.context_length=63"])


def test_threads_per_rank_default_to_a_share_of_the_cores_and_twice_that_for_large_pipeline_stages():
    """Ranks of one host split its cores; a pipeline stage with 1 GFLOP or more per micro-batch's forward pass,
    idle in the bubble and while it waits for its peer, gets twice its share (measured 1.12x faster on 2 cores at
    6.1 GFLOP, 0.83x at gpt-tiny's 0.24 GFLOP), never more than the host has."""
    from hvdtrain import runtime
    from hvdtrain.distributed.core import default_threads

    assert default_threads(2, 1) == 2 and default_threads(2, 2) == 1 and default_threads(8, 4) == 2
    assert default_threads(2, 4) == 1  # never 0
    assert default_threads(2, 2, double=True) == 2 and default_threads(8, 8, double=True) == 2
    assert default_threads(2, 1, double=True) == 2  # capped at the host's cores
    assert default_threads(16, 4, double=True) == 8

    def stage(*overrides):
        return runtime.stage_forward_flops(config.load("gpt-tiny", overrides=list(overrides)))

    assert stage() == 0.0 and stage("parallel.tensor=2") == 0.0  # no pipeline: no stage
    tiny = stage("parallel.pipeline=2", "parallel.microbatches=4")  # 8 examples x 64 tokens, half of 2.78 MFLOP x 1/3
    assert tiny == pytest.approx(2_775_552 / 3 * 8 * 64 / 2) and tiny < runtime.DOUBLE_THREADS_FLOPS
    wide = stage("parallel.pipeline=2", "parallel.microbatches=8", "data.batch_size_per_rank=64",
                 "model.params={num_layers: 4, width: 512, num_heads: 8, dropout: 0.0}")
    assert wide == pytest.approx(78_024_192 / 3 * 8 * 64 / 2) and wide >= runtime.DOUBLE_THREADS_FLOPS


def test_benchmark_layouts_are_written_as_users_type_them():
    from hvdtrain.benchmark import layouts
    from hvdtrain.errors import UsageError

    lay = layouts.parse("dp=2,fsdp,noprefetch,recompute")
    assert lay["shard_params"] and lay["prefetch"] is False and lay["recompute"] and lay["ranks"] == 2
    assert layouts.label(lay) == "dp2+fsdp+recompute+noprefetch"
    assert layouts.parse("dp=4,fsdp")["prefetch"] is True
    assert layouts.label(layouts.parse("dp=2,fsdp,b=2")) == "dp2+fsdp+b2"
    assert layouts.label(layouts.parse("dp=4,fsdp,s=2")) == "dp4+fsdp+s2"
    with pytest.raises(UsageError, match="unknown part 'fdsp'"):
        layouts.parse("dp=2,fdsp")
