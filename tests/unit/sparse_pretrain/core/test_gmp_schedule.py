import pytest

from sparse_pretrain.core.gmp_schedule import GMPClock, GMPSchedule, cubic_sparsity

PAPER = dict(start=0, policy_end=50_000, end=80_000, interval=1_000)


@pytest.mark.parametrize("final", [0.85, 0.9])
def test_paper_schedule_values(final):
    schedule = GMPSchedule(final_sparsity=final, **PAPER)
    assert schedule.sparsity(0) == 0.0
    # halfway through the policy window: s_f + (0 - s_f) * (1 - 1/2)^3 = s_f * 7/8
    assert schedule.sparsity(25_000) == pytest.approx(final * 7 / 8, abs=1e-15)
    assert schedule.sparsity(50_000) == final
    assert schedule.sparsity(80_000) == final
    assert schedule.sparsity(99_999) == final


def test_cubic_formula_with_offset_start_and_initial_sparsity():
    # s_t = s_f + (s_i - s_f)(1 - (t - t_s)/(t_e - t_s))^3 with t_s=1000, t_e=5000, s_i=0.2, s_f=0.8
    assert cubic_sparsity(3_000, 0.2, 0.8, 1_000, 5_000) == pytest.approx(0.8 + (0.2 - 0.8) * 0.5**3)
    assert cubic_sparsity(500, 0.2, 0.8, 1_000, 5_000) == 0.2
    assert cubic_sparsity(6_000, 0.2, 0.8, 1_000, 5_000) == 0.8


def test_update_steps_are_start_plus_multiples_of_interval_up_to_end():
    schedule = GMPSchedule(final_sparsity=0.9, **PAPER)
    steps = list(schedule.update_steps())
    assert steps[:3] == [0, 1_000, 2_000] and steps[-1] == 80_000 and len(steps) == 81
    assert schedule.is_update_step(80_000) and not schedule.is_update_step(81_000)
    assert not schedule.is_update_step(1_500)
    # masks in force between updates keep the last update's target; frozen after end
    assert schedule.sparsity_for_mask_at(1_999) == schedule.sparsity(1_000)
    assert schedule.sparsity_for_mask_at(95_000) == schedule.sparsity(80_000)
    late = GMPSchedule(final_sparsity=0.5, start=100, policy_end=200, end=300, interval=10)
    assert late.sparsity_for_mask_at(50) == 0.0


def test_clock_ticks_and_round_trips():
    schedule = GMPSchedule(final_sparsity=0.9, start=2, policy_end=6, end=8, interval=2)
    clock = GMPClock(schedule)
    targets = [clock.tick() for _ in range(10)]
    assert targets == [None, None, 0.0, None, schedule.sparsity(4), None, 0.9, None, 0.9, None]
    fresh = GMPClock(schedule)
    for _ in range(5):
        fresh.tick()
    resumed = GMPClock(schedule)
    resumed.load_state_dict(fresh.state_dict())
    assert [resumed.tick() for _ in range(5)] == targets[5:]
    other = GMPClock(GMPSchedule(final_sparsity=0.8, start=2, policy_end=6, end=8, interval=2))
    with pytest.raises(ValueError, match="resume with the same schedule"):
        other.load_state_dict(fresh.state_dict())


@pytest.mark.parametrize("kwargs, key", [
    (dict(final_sparsity=1.0), "final_sparsity"),
    (dict(final_sparsity=-0.1), "final_sparsity"),
    (dict(final_sparsity=0.9, start=10, policy_end=10), "policy_end"),
    (dict(final_sparsity=0.9, policy_end=100, end=50), "end"),
    (dict(final_sparsity=0.9, interval=0), "interval"),
    (dict(final_sparsity=0.5, initial_sparsity=0.6), "initial_sparsity"),
])
def test_bad_schedules_name_the_key(kwargs, key):
    with pytest.raises(ValueError, match=f"^{key}:"):
        GMPSchedule(**kwargs)
