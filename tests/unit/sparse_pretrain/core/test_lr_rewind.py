import pytest
import torch

from sparse_pretrain.core.lr_rewind import RewoundLinearLR, rewound_lr_scheduler

T, W, TS, TE, F = 100_000, 1_000, 0, 50_000, 1_000
P = TE - TS


def paper_factor():
    return RewoundLinearLR(T, W, TS, TE, F)


@pytest.mark.parametrize("step, expected", [
    (0, 0.0),
    (500, 500 / 1000),                                   # warmup wins, even inside the window
    (999, 999 / 1000),
    (1000, (T - P - TS - 0) / (T - P - W)),              # rewind: clock back at t_s -> 50000/49000
    (1001, (T - P - TS - 1) / (T - P - W)),
    (1999, (T - P - TS - 999) / (T - P - W)),            # end of a sawtooth tooth: 49001/49000
    (2000, (T - P - TS - 0) / (T - P - W)),              # rewound again
    (49_999, (T - P - TS - 999) / (T - P - W)),
    (50_000, (T - 50_000) / (T - P - W)),                # t_e: decay resumes from the t_s value, no drop
    (75_000, (T - 75_000) / (T - P - W)),                # 25000/49000
    (99_999, 1 / (T - P - W)),
    (100_000, 0.0),
])
def test_paper_rewound_lr_at_named_steps(step, expected):
    assert paper_factor()(step) == pytest.approx(expected, rel=1e-12, abs=1e-15)


def test_no_drop_at_policy_end_and_peak_value():
    f = paper_factor()
    assert f(TE) - f(TE - 1) == pytest.approx(999 / 49_000)  # back to the t_s value, not below it
    assert f(TE) == pytest.approx(50_000 / 49_000)
    assert max(f(t) for t in range(T)) == pytest.approx(50_000 / 49_000)


def test_window_starting_later():
    f = RewoundLinearLR(total_steps=1_000, warmup_steps=10, start=100, policy_end=300, interval=50)
    d = 1_000 - 200 - 10
    assert f(5) == 0.5
    assert f(99) == pytest.approx((800 - 99) / d)                 # before the window: plain decay
    assert f(100) == f(150) == f(250) == pytest.approx((800 - 100) / d)
    assert f(149) == pytest.approx((800 - 149) / d)
    assert f(300) == pytest.approx((1_000 - 300) / d) == f(100)   # resumes from the t_s value
    assert f(999) == pytest.approx(1 / d)


def test_without_rewinding_it_is_plain_linear_decay():
    f = RewoundLinearLR(T, W, TS, TE, F, rewind=False)
    assert f(500) == 0.5
    assert f(2000) == pytest.approx((T - 2000) / (T - W))
    assert f(75_000) == pytest.approx((T - 75_000) / (T - W))


def test_lambdalr_drives_the_optimizer_and_resumes():
    def make():
        param = torch.nn.Parameter(torch.zeros(1))
        opt = torch.optim.SGD([param], lr=1e-4)
        return opt, rewound_lr_scheduler(opt, RewoundLinearLR(100, 10, 0, 50, 10))

    opt, sched = make()
    seen = []
    for _ in range(60):
        seen.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    assert seen[5] == pytest.approx(1e-4 * 0.5)
    assert seen[10] == pytest.approx(1e-4 * 50 / 40) and seen[20] == seen[10]
    assert seen[50] == pytest.approx(1e-4 * 50 / 40)
    # resume from step 30 in a fresh scheduler: the remaining curve is identical
    opt2, sched2 = make()
    for _ in range(30):
        opt2.step()
        sched2.step()
    state = sched2.state_dict()
    assert state["lr_lambdas"][0]["policy_end"] == 50      # the callable's settings are saved
    opt3, sched3 = make()
    sched3.load_state_dict(state)
    opt3.param_groups[0]["lr"] = sched3.get_last_lr()[0]
    resumed = []
    for _ in range(30):
        resumed.append(opt3.param_groups[0]["lr"])
        opt3.step()
        sched3.step()
    assert resumed == seen[30:]


def test_bad_lr_settings():
    with pytest.raises(ValueError, match="must exceed"):
        RewoundLinearLR(total_steps=1_000, warmup_steps=100, start=0, policy_end=900, interval=10)
