"""The parts of model parallelism that need no ranks: the rank grid, the stage split, the schedules, the checks."""
import numpy as np
import pytest

from hvdtrain import config
from hvdtrain.distributed import mesh, pipeline
from hvdtrain.errors import ConfigError


def test_rank_grid_puts_tensor_groups_on_consecutive_ranks():
    groups = mesh.all_groups(8, tensor=2, pipeline=2)
    assert groups["tensor"] == [(0, 1), (2, 3), (4, 5), (6, 7)]
    assert groups["data"] == [(0, 2), (1, 3), (4, 6), (5, 7)]
    assert groups["pipeline"] == [(0, 4), (1, 5), (2, 6), (3, 7)]
    assert groups["stage"] == [(0, 1, 2, 3), (4, 5, 6, 7)]
    assert groups["edge"] == [(0, 4), (1, 5), (2, 6), (3, 7)]
    assert groups["replica"] == [(0, 1, 4, 5), (2, 3, 6, 7)]  # every rank of one copy of the model
    assert groups["tie"] == [(0, 4), (1, 5), (2, 6), (3, 7)]  # first and last stage (tied embeddings)


def test_hybrid_sharding_groups_run_of_consecutive_data_ranks_that_replicate_each_other():
    """parallel.shard_degree: within a data group, runs of consecutive members shard (on one host when hosts hold
    whole runs), the members at the same place in each run replicate; without it the shard group is the data
    group and nothing replicates. A degree that does not divide the data degree is a one-line config error."""
    groups = mesh.all_groups(8, tensor=1, pipeline=1, shard=2)
    assert groups["shard"] == [(0, 1), (2, 3), (4, 5), (6, 7)]
    assert groups["replicate"] == [(0, 2, 4, 6), (1, 3, 5, 7)]
    grid = mesh.all_groups(8, tensor=2, pipeline=1, shard=2)  # data=4: data groups (0,2,4,6) and (1,3,5,7)
    assert grid["shard"] == [(0, 2), (4, 6), (1, 3), (5, 7)] and grid["replicate"] == [(0, 4), (2, 6), (1, 5), (3, 7)]
    whole = mesh.all_groups(8, tensor=2, pipeline=2)
    assert whole["shard"] == whole["data"] and all(len(g) == 1 for g in whole["replicate"])
    with pytest.raises(ConfigError, match="shard_degree=3 must divide the data-parallel degree 4: use one of 1, 2, 4"):
        mesh.all_groups(4, tensor=1, pipeline=1, shard=3)


def test_a_layout_that_does_not_divide_the_world_is_a_config_error():
    assert mesh.layout(4, 2, 1) == 2
    with pytest.raises(ConfigError, match="cannot be laid out as tensor=3 x pipeline=1"):
        mesh.layout(2, 3, 1)


@pytest.mark.parametrize("micro", [1, 2, 4, 8])
def test_gpipe_bubble_is_the_textbook_fraction(micro):
    stages = 4
    table = pipeline.timetable("gpipe", stages, micro)
    assert pipeline.bubble_fraction(table) == pytest.approx((stages - 1) / (micro + stages - 1))
    assert all(pipeline.peak_activations(table, s) == micro for s in range(stages))


@pytest.mark.parametrize("micro", [1, 2, 4, 8])
def test_1f1b_keeps_at_most_p_minus_s_activations_with_the_same_bubble(micro):
    stages = 4
    table = pipeline.timetable("1f1b", stages, micro)
    assert pipeline.bubble_fraction(table) == pytest.approx((stages - 1) / (micro + stages - 1))
    for s in range(stages):
        assert pipeline.peak_activations(table, s) == min(stages - s, micro)


def test_every_stage_runs_each_micro_batch_forward_then_backward():
    for schedule in pipeline.SCHEDULES:
        table = pipeline.timetable(schedule, 3, 5)
        for s in range(3):
            ops = [row[s] for row in table if row[s] is not None]
            assert sorted(map(repr, ops)) == sorted([f"F{m}" for m in range(5)] + [f"B{m}" for m in range(5)])
            assert ops == pipeline.stage_ops(schedule, s, 3, 5)


def test_stages_are_balanced_by_parameters_with_the_embedding_first_and_the_head_last():
    import models

    plan = models.parallel_plan("gpt", input_shape=(16,), num_classes=256, num_layers=4, width=32, num_heads=4)
    parts = [[u.name for u in units] for units in pipeline.split_stages(plan, 2)]
    assert parts[0][0] == "embed" and parts[-1][-1] == "head"
    assert [p for part in parts for p in part if p.startswith("block_")] == [f"block_{i}" for i in range(4)]
    # the first stage carries the 256-token embedding, the last the 256-way logits: blocks split 2 + 2 here
    assert sum(p.startswith("block_") for p in parts[0]) == 2
    with pytest.raises(ValueError, match="at least 5 blocks"):
        pipeline.split_stages(plan, 5)


def test_a_unit_cut_into_buckets_keeps_its_weights_in_order_at_near_equal_sizes():
    """parallel.buckets_per_unit: a gpt block in two is its attention and its MLP (the cut nearest the half), in
    three near thirds; a unit of one weight stays whole."""
    import models
    from hvdtrain.distributed.fsdp import cut

    plan = models.parallel_plan("gpt", input_shape=(16,), num_classes=256, num_layers=1, width=64, num_heads=4)
    block, size = list(plan.units[1].weights), lambda w: int(np.prod(w.shape))
    assert cut("block_0", block, size, 1) == [("block_0", block)]
    two = cut("block_0", block, size, 2)
    assert [k for k, _ in two] == ["block_0/0", "block_0/1"] and [w for _, g in two for w in g] == block
    assert two[1][1][0].name == "block_0/mlp/fc/kernel"
    thirds = [sum(map(size, g)) for _, g in cut("block_0", block, size, 3)]
    assert max(thirds) - min(thirds) < 0.01 * sum(thirds)
    embed = [plan.weight("embed/tokens/embeddings")]
    assert cut("embed", embed, size, 4) == [("embed", embed)]
    # 0 (the default): buckets of at most 16 MB of float32: a block of width 512 (12 MB) whole, of 768 (27 MB) in two
    for width, parts in ((512, 1), (768, 2), (1024, 4)):
        wide = models.parallel_plan("gpt", input_shape=(16,), num_classes=256, num_layers=1, width=width, num_heads=4)
        assert len(cut("block_0", list(wide.units[1].weights), size, 0)) == parts


def test_the_plan_names_every_weight_of_the_keras_model_with_its_shape():
    """The plan is the engines' only view of the model: it must list exactly the Keras model's variables."""
    import models
    from models.plan import keras_variables

    for family, tied in (("gpt", False), ("gpt", True), ("llama", False), ("llama", True)):
        params = dict(num_layers=2, width=32, num_heads=4, tie_embeddings=tied)
        model = models.build(family, input_shape=(16,), num_classes=256, **params)
        plan = models.parallel_plan(family, input_shape=(16,), num_classes=256, **params)
        assert models.plan_of(model) == plan or models.plan_of(model).weights == plan.weights
        found = keras_variables(model, plan)
        assert sorted(found) == sorted(w.name for w in plan.weights)
        assert sorted(v.name for v in model.trainable_weights) == sorted(f"{n}:0" for n in found)
        # besides, each layer with dropout keeps its step counter (not trainable)
        assert {v.name.split("/")[-1] for v in model.non_trainable_weights} == {"dropout_step:0"}
        assert plan.parameters == sum(int(np.prod(v.shape)) for v in model.trainable_weights)


def test_model_flops_per_token_are_palms_count():
    """6N + 12LHQT: N the multiplied parameters (embedding tables are read by index, unless tied logits multiply by
    the token table), attention over the whole context; recomputation runs the blocks' forward pass twice."""
    import models

    w, layers, context, vocab = 32, 2, 16, 256
    gpt_block, llama_block = 12 * w * w + 13 * w, 4 * w * w + 3 * w * 96 + 2 * w  # llama: bias-free, SwiGLU of 96
    attention = 12 * layers * w * context
    for family, block, head, tied in (("gpt", gpt_block, 2 * w + w * vocab + vocab, False),
                                      ("gpt", gpt_block, 2 * w + w * vocab, True),
                                      ("llama", llama_block, w + w * vocab, False)):
        params = dict(num_layers=layers, width=w, num_heads=4, tie_embeddings=tied,
                      **({"mlp_hidden": 96, "kv_heads": 4} if family == "llama" else {}))
        plan = models.parallel_plan(family, input_shape=(context,), num_classes=vocab, **params)
        model_flops = 6 * (layers * block + head) + attention
        assert plan.flops_per_token() == model_flops, family
        assert plan.flops_per_token(recompute=True) == model_flops + (6 * layers * block + attention) / 3


def test_per_variable_seeds_give_each_slice_the_one_process_values():
    """A rank makes one variable at a time from its own seed and keeps its slice: the slices of every rank
    put together are the one-process model's variable, and no two variables share a seed."""
    import numpy as np

    import models
    from hvdtrain.distributed.tensor import split
    from models.plan import initial_value

    plan = models.parallel_plan("gpt", input_shape=(16,), num_classes=256, num_layers=2, width=32, num_heads=4)
    kernel = plan.weight("block_0/attn/query/kernel")
    whole = initial_value(kernel, seed=3).numpy()
    parts = [np.asarray(split(initial_value(kernel, seed=3), 2, r, kernel.split)) for r in range(2)]
    assert np.array_equal(np.concatenate(parts, axis=kernel.split), whole)
    other = initial_value(plan.weight("block_1/attn/query/kernel"), seed=3).numpy()
    assert not np.allclose(whole, other) and not np.allclose(whole, initial_value(kernel, seed=4).numpy())


@pytest.mark.parametrize("override, words", [
    (["parallel.tensor=3"], ["parallel.tensor=3 must divide model.params.num_heads=4"]),
    (["parallel.pipeline=3"], ["parallel.pipeline=3 stages need at least as many blocks; the model has 2"]),
    (["parallel.pipeline=2", "parallel.microbatches=5"], ["parallel.microbatches=5 must divide "
                                                          "data.batch_size_per_rank=32"]),
    (["parallel.pipeline=2", "train.elastic=true"], ["elastic training runs data parallelism only"]),
    (["parallel.tensor=2", "train.clip_norm=-1"], ["train.clip_norm must be 0 (off) or positive"]),
    (["parallel.microbatches=2"], ["parallel.microbatches > 1 needs parallel.pipeline > 1"]),
    (["parallel.schedule=zb"], ["parallel.schedule", "gpipe, 1f1b"]),
])
def test_bad_layouts_are_one_line_config_errors(override, words):
    with pytest.raises(ConfigError) as info:
        config.load("gpt-tiny", overrides=override)
    for w in words:
        assert w in str(info.value)
    assert "\n" not in str(info.value)


def test_model_parallelism_needs_a_family_with_a_plan():
    with pytest.raises(ConfigError, match=r"need a model family with a parallel plan \(gpt, llama\), not 'cnn'"):
        config.load("digits-cnn", overrides=["parallel.tensor=2"])
    assert config.load("digits-cnn", overrides=["parallel.shard_optimizer=true"]).parallel.shard_optimizer


def test_dropout_sites_are_distinct_across_blocks_and_stages_and_masks_differ():
    """Every dropout call of a forward pass has its own site (block i's MLP and block i+1's attention used to
    share one), whichever pipeline stage runs the unit; distinct sites give distinct masks, the same site and key
    the same mask."""
    import tensorflow as tf

    import models
    from models.plan import DropoutKey, dropout

    for family in ("gpt", "llama"):
        plan = models.parallel_plan(family, input_shape=(8,), num_classes=64, num_layers=3, width=16, num_heads=2,
                                    dropout=0.5)
        sites = []

        class Recording:
            size, rank, dtype, training = 1, 0, "float32", True

            def enter(self, x):
                return x

            exit = max = min = enter

            def dropout(self, x, rate, site, split_axis=None):
                sites.append(site)
                return x

        x = tf.zeros([2, 8], tf.int32)
        params = {w.name: tf.ones(w.shape) * 0.01 for w in plan.weights}
        for unit in plan.units:
            x = plan.apply(unit, params, x, Recording())
        assert len(sites) == len(set(sites)) == 1 + 3 * 3, (family, sites)
    ones = tf.ones([2, 8, 16])
    key = DropoutKey(0, 5, 0)
    first, again, other = dropout(ones, 0.5, key, 9), dropout(ones, 0.5, key, 9), dropout(ones, 0.5, key, 10)
    assert np.array_equal(first, again) and not np.array_equal(first, other)
    assert not np.array_equal(first, dropout(ones, 0.5, DropoutKey(0, 6, 0), 9))  # another step
    assert 0.4 < float(tf.reduce_mean(tf.cast(first > 0, tf.float32))) < 0.6


def test_a_members_dropout_mask_is_its_slice_of_the_whole_mask_traced_or_not():
    """A member holding 1/parts of an activation along an axis draws exactly that slice of the whole activation's
    mask, whether the sizes are known when tracing (the indices are constants) or not (computed in the graph); and
    a site costs few ops to trace (182 before the indices were folded into constants and (seed, step) hashed once
    per pass)."""
    import tensorflow as tf

    from models.plan import DropoutKey, dropout

    ones = tf.ones([4, 6, 8])
    whole = dropout(ones, 0.5, DropoutKey(3, 7, 5), 2).numpy()
    for axis in (1, 2):
        for dims in ([4, 6 // (3 - axis), 8 // axis], [None, None, None]):
            def member(rank):
                return tf.function(lambda x: dropout(x, 0.5, DropoutKey(3, tf.constant(7, tf.int64), 5), 2, axis,
                                                     rank, 2), autograph=False).get_concrete_function(
                    tf.TensorSpec(dims))

            parts = [member(r)(p) for r, p in enumerate(np.split(np.ones([4, 6, 8], np.float32), 2, axis))]
            assert np.array_equal(np.concatenate([p.numpy() for p in parts], axis), whole), (axis, dims)

    def sites(x, step):
        key = DropoutKey(0, step, 0)
        for site in range(4):
            x = dropout(x, 0.1, key, site, 2, 1, 2)
        return x

    graph = tf.function(sites, autograph=False).get_concrete_function(
        tf.TensorSpec([None, 16, 32]), tf.TensorSpec([], tf.int64)).graph
    assert len(graph.get_operations()) < 4 * 80
