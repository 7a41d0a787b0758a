import math

import pytest

from hvdtrain.errors import DataError
from hvdtrain.batch_plan import make_plan, scale_learning_rate
from hvdtrain.schedule import WarmupSchedule


def test_plan_world_size_arithmetic():
    p = make_plan(num_train_examples=1293, data_ranks=2, batch_size_per_rank=32, epochs=12,
                  learning_rate=1e-3, lr_scaling="linear", warmup_epochs=1)
    assert p.examples_per_rank == 646
    assert p.steps_per_epoch == 646 // 32 == 20
    assert p.global_batch_size == 64
    assert p.learning_rate == pytest.approx(2e-3)
    assert p.warmup_steps == 20
    assert p.total_steps == 240


def test_lr_scaling_rules():
    assert scale_learning_rate(0.1, 4, "linear") == pytest.approx(0.4)
    assert scale_learning_rate(0.1, 4, "sqrt") == pytest.approx(0.2)
    assert scale_learning_rate(0.1, 4, "none") == pytest.approx(0.1)


def test_plan_rejects_too_little_data():
    with pytest.raises(DataError, match="lower data.batch_size_per_rank"):
        make_plan(num_train_examples=40, data_ranks=2, batch_size_per_rank=32, epochs=1, learning_rate=0.1)
    with pytest.raises(DataError, match="cannot be shared by 4 ranks"):
        make_plan(num_train_examples=3, data_ranks=4, batch_size_per_rank=1, epochs=1, learning_rate=0.1)


def test_plan_keeps_whole_accumulation_cycles():
    p = make_plan(num_train_examples=1000, data_ranks=2, batch_size_per_rank=32, epochs=1, learning_rate=0.1,
                  backward_passes_per_step=4)
    assert p.steps_per_epoch == 12  # 15 batches -> 3 whole cycles of 4


def test_warmup_is_linear_then_schedule():
    def s(step):
        return float(sched(step))

    sched = WarmupSchedule(base_lr=0.1, peak_lr=0.4, warmup_steps=10, total_steps=110, kind="cosine")
    assert s(0) == pytest.approx(0.1)
    assert s(5) == pytest.approx(0.25)
    assert s(10) == pytest.approx(0.4)
    assert s(60) == pytest.approx(0.2)
    assert s(110) == pytest.approx(0.0, abs=1e-12)
    step = WarmupSchedule(base_lr=0.4, peak_lr=0.4, kind="step", step_every=10, step_factor=0.5)
    assert [float(step(i)) for i in (0, 9, 10, 25)] == pytest.approx([0.4, 0.4, 0.2, 0.1])
    const = WarmupSchedule(base_lr=1.0, peak_lr=1.0)
    assert all(math.isclose(float(const(i)), 1.0) for i in range(5))
    assert WarmupSchedule.from_config(sched.get_config()).get_config() == sched.get_config()
    with pytest.raises(ValueError, match="one of constant"):
        WarmupSchedule(0.1, 0.1, kind="linear")
