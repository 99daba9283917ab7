import numpy as np
import pytest

from ncppo.evaluation.stats import paired_win_rate


def test_constructed_cases():
    a = np.zeros(40)
    assert paired_win_rate(a, a + 1).rate == 1.0
    ties = paired_win_rate(a, a)
    assert (ties.rate, ties.ties, ties.wins, ties.losses) == (0.5, 40, 0, 0)
    half = paired_win_rate(a, np.r_[np.ones(20), -np.ones(20)])
    assert half.rate == 0.5 and half.wins == 20 and half.losses == 20
    assert half.low < 0.5 < half.high
    lost = paired_win_rate(a + 1, a)
    assert lost.rate == 0.0 and lost.low == lost.high == 0.0


def test_tie_tolerance_and_groups():
    a = np.zeros(6)
    b = np.array([1e-9, -1e-9, 0.5, 0.5, -0.5, 0.0])
    win = paired_win_rate(a, b, groups=[0, 0, 1, 1, 2, 2], tie_tolerance=1e-6)
    assert (win.wins, win.ties, win.losses, win.prompts) == (2, 3, 1, 3)
    assert win.rate == pytest.approx((2 + 1.5) / 6)


def test_bootstrap_resamples_prompts_not_items():
    # 10 prompts, each with 20 identical outcomes: items are not independent, so the interval must be
    # as wide as 10 units allow, not as narrow as 200 independent items would make it
    outcome = np.repeat(np.r_[np.ones(5), -np.ones(5)], 20)
    groups = np.repeat(np.arange(10), 20)
    clustered = paired_win_rate(np.zeros(200), outcome, groups=groups)
    independent = paired_win_rate(np.zeros(200), outcome)
    assert clustered.high - clustered.low > 2 * (independent.high - independent.low)


def test_intervals_cover_the_truth_at_about_the_nominal_rate():
    rng = np.random.default_rng(0)
    truth, covered, trials = 0.6, 0, 300
    for trial in range(trials):
        wins = rng.random(100) < truth
        win = paired_win_rate(np.zeros(100), np.where(wins, 1.0, -1.0), n_boot=400, seed=trial)
        covered += win.low <= truth <= win.high
    assert 0.90 <= covered / trials <= 0.98


def test_bad_input_is_named():
    with pytest.raises(ValueError, match="equal, non-empty"):
        paired_win_rate([1, 2], [1])
    with pytest.raises(ValueError, match="groups"):
        paired_win_rate([1, 2], [1, 2], groups=[0])


def test_win_rate_text_and_round_trip():
    from ncppo.evaluation.stats import WinRate, bradley_terry_probability

    win = paired_win_rate(np.zeros(10), np.r_[np.ones(6), -np.ones(4)], n_boot=200)
    assert str(win) == f"{100 * win.rate:.1f}% [{100 * win.low:.1f}, {100 * win.high:.1f}]" and win.counts == "6/0/4"
    assert WinRate.from_dict({**win.to_dict(), "a": "base", "b": "run"}) == win
    assert bradley_terry_probability(0.0, 0.05) == 0.5
    np.testing.assert_allclose(bradley_terry_probability(np.array([0.1, -0.1]), 0.05), 1 / (1 + np.exp([-2.0, 2.0])))


def test_mean_interval_resamples_prompts():
    from ncppo.evaluation.stats import mean_interval

    rng = np.random.default_rng(0)
    values = rng.normal(1.0, 1.0, 400)
    m = mean_interval(values, groups=np.repeat(np.arange(100), 4))
    assert m.mean == values.mean() and m.low < m.mean < m.high and m.prompts == 100
    assert 0.1 < m.high - m.low < 0.6  # about 4 standard errors of 100 prompt means
    one = mean_interval([1.0, 2.0, 3.0], groups=["p", "p", "p"])
    assert (one.low, one.high, one.prompts) == (2.0, 2.0, 1)
    assert str(mean_interval([2.5, 2.5])) == "2.5 [2.5, 2.5]"
