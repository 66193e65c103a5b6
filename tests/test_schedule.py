"""ramgpt.schedule.lr_at: linear warmup from step 1, then cosine (or constant) decay, as a pure
function of the 1-based optimizer step."""

from __future__ import annotations

import math

import pytest

from ramgpt.config import SchedulerConfig
from ramgpt.schedule import lr_at

PEAK = 3e-4


def cosine(warmup: int = 10, min_lr_ratio: float = 0.1, decay_steps: int | None = None) -> SchedulerConfig:
    return SchedulerConfig(kind="cosine", warmup_steps=warmup, min_lr_ratio=min_lr_ratio, decay_steps=decay_steps)


def test_warmup_starts_at_step_one_with_peak_over_warmup():
    cfg = cosine(warmup=10)
    assert lr_at(1, PEAK, cfg, max_steps=100) == pytest.approx(PEAK / 10)
    # step 0 (or below) is treated as step 1: the first update never gets lr 0
    assert lr_at(0, PEAK, cfg, max_steps=100) == pytest.approx(PEAK / 10)
    assert lr_at(-5, PEAK, cfg, max_steps=100) > 0.0


def test_warmup_is_linear_and_peaks_at_warmup_steps():
    cfg = cosine(warmup=10)
    lrs = [lr_at(s, PEAK, cfg, max_steps=100) for s in range(1, 11)]
    assert lrs == pytest.approx([PEAK * s / 10 for s in range(1, 11)])
    assert lr_at(10, PEAK, cfg, max_steps=100) == pytest.approx(PEAK)
    assert max(lr_at(s, PEAK, cfg, max_steps=100) for s in range(1, 101)) == pytest.approx(PEAK)


def test_no_warmup_starts_at_peak():
    cfg = cosine(warmup=0)
    assert lr_at(1, PEAK, cfg, max_steps=100) == pytest.approx(PEAK, rel=1e-3)
    assert lr_at(1, PEAK, cfg, max_steps=100) <= PEAK


def test_cosine_ends_at_min_lr_ratio_at_max_steps_and_stays_there():
    cfg = cosine(warmup=10, min_lr_ratio=0.1)
    assert lr_at(100, PEAK, cfg, max_steps=100) == pytest.approx(0.1 * PEAK)
    assert lr_at(101, PEAK, cfg, max_steps=100) == pytest.approx(0.1 * PEAK)
    assert lr_at(10_000, PEAK, cfg, max_steps=100) == pytest.approx(0.1 * PEAK)


def test_cosine_midpoint_is_halfway_between_peak_and_floor():
    cfg = cosine(warmup=10, min_lr_ratio=0.2)
    mid = 10 + 90 // 2  # progress 0.5
    assert lr_at(mid, PEAK, cfg, max_steps=100) == pytest.approx(0.2 * PEAK + 0.8 * PEAK * 0.5)


def test_cosine_formula_at_a_few_steps():
    cfg = cosine(warmup=5, min_lr_ratio=0.1)
    for step in (6, 17, 42, 99):
        progress = (step - 5) / (100 - 5)
        want = 0.1 * PEAK + 0.9 * PEAK * 0.5 * (1 + math.cos(math.pi * progress))
        assert lr_at(step, PEAK, cfg, max_steps=100) == pytest.approx(want)


def test_monotone_decreasing_after_warmup():
    cfg = cosine(warmup=10)
    lrs = [lr_at(s, PEAK, cfg, max_steps=200) for s in range(10, 201)]
    assert all(a >= b for a, b in zip(lrs, lrs[1:]))
    assert lrs[0] > lrs[-1]  # and it really decays
    assert all(lr >= 0.1 * PEAK - 1e-12 for lr in lrs)


def test_min_lr_ratio_zero_decays_to_zero_only_at_the_end():
    cfg = cosine(warmup=0, min_lr_ratio=0.0)
    assert lr_at(100, PEAK, cfg, max_steps=100) == pytest.approx(0.0, abs=1e-15)
    assert lr_at(99, PEAK, cfg, max_steps=100) > 0.0


def test_constant_keeps_peak_after_warmup():
    cfg = SchedulerConfig(kind="constant", warmup_steps=4, min_lr_ratio=0.1)
    assert lr_at(1, PEAK, cfg, max_steps=100) == pytest.approx(PEAK / 4)
    assert lr_at(4, PEAK, cfg, max_steps=100) == pytest.approx(PEAK)
    assert all(lr_at(s, PEAK, cfg, max_steps=100) == PEAK for s in (5, 50, 100, 1000))


def test_decay_steps_overrides_max_steps():
    cfg = cosine(warmup=10, min_lr_ratio=0.1, decay_steps=50)
    assert lr_at(50, PEAK, cfg, max_steps=1000) == pytest.approx(0.1 * PEAK)
    assert lr_at(500, PEAK, cfg, max_steps=1000) == pytest.approx(0.1 * PEAK)  # flat after decay_steps
    assert lr_at(30, PEAK, cfg, max_steps=1000) > 0.1 * PEAK
    # without decay_steps the same step is still far from the floor
    assert lr_at(50, PEAK, cosine(warmup=10), max_steps=1000) > 0.9 * PEAK


def test_decay_steps_not_larger_than_warmup_does_not_divide_by_zero():
    cfg = cosine(warmup=10, min_lr_ratio=0.1, decay_steps=10)
    assert lr_at(10, PEAK, cfg, max_steps=100) == pytest.approx(PEAK)
    assert lr_at(11, PEAK, cfg, max_steps=100) == pytest.approx(0.1 * PEAK)


def _meta_for(profile) -> dict:
    from ramgpt.schedule import Schedule

    return {"config": profile.to_public_dict(), "schedule": Schedule.from_profile(profile).to_dict()}


def test_resume_with_more_steps_continues_the_saved_schedule() -> None:
    from ramgpt.config import load_profile
    from ramgpt.schedule import resume_schedule

    saved = load_profile("micro-test", ["optim.max_steps=60", "scheduler.warmup_steps=5"], use_env=False)
    longer = load_profile("micro-test", ["optim.max_steps=100", "scheduler.warmup_steps=5"], use_env=False)
    sched, note = resume_schedule(longer, _meta_for(saved))
    assert sched.decay_end == 60, "max_steps alone must not stretch the cosine"
    assert sched.lr_at(70) == pytest.approx(saved.optim.lr * saved.scheduler.min_lr_ratio)
    assert sched.lr_at(60) == pytest.approx(sched.lr_at(61)), "no jump after the saved end"
    assert note is not None and "continuing the saved schedule" in note and "scheduler.decay_steps" in note


def test_a_deliberate_schedule_change_on_resume_is_taken_and_announced() -> None:
    from ramgpt.config import load_profile
    from ramgpt.schedule import resume_schedule

    saved = load_profile("micro-test", ["optim.max_steps=60"], use_env=False)
    changed = load_profile("micro-test", ["optim.max_steps=100", "scheduler.decay_steps=100", "optim.lr=1e-4"],
                           use_env=False)
    sched, note = resume_schedule(changed, _meta_for(saved))
    assert sched.decay_end == 100 and sched.peak_lr == 1e-4
    assert note is not None and note.startswith("schedule changed on resume") and "step 100" in note


def test_resume_of_a_checkpoint_without_a_saved_schedule_uses_its_config() -> None:
    from ramgpt.config import load_profile
    from ramgpt.schedule import resume_schedule

    saved = load_profile("micro-test", ["optim.max_steps=40"], use_env=False)
    meta = {"config": saved.to_public_dict()}  # what checkpoints written before this change hold
    sched, _ = resume_schedule(load_profile("micro-test", ["optim.max_steps=80"], use_env=False), meta)
    assert sched.decay_end == 40
