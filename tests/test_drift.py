"""Drift alarms (padim.monitor.drift): the false-alarm guarantee against simulation (many exchangeable
streams, counted), never against the code's own arithmetic; the online p-values against their
definition and against uniformity; detection of shifted streams within a bound; the monitor's state,
reset, validation and threads. NumPy only: no torch."""

import json
import math
import sys
import threading
from decimal import Decimal, getcontext

import numpy as np
import pytest

from padim.errors import PadimError
from padim.monitor.drift import (STREAMS, ConformalMartingale, DriftError, DriftMonitor, OnlinePValues, RankCounter,
                                 ScoreGrid, _log_cash, _log_restart_weight, stream_inputs)

DELTAS = (0.01, 0.05, 0.1, 0.2)


def _binomial_upper(n: int, p: float, level: float = 1e-3) -> int:
    """The smallest k with P(Binomial(n, p) > k) <= level: the slack the alarm counts are allowed.
    If the true false-alarm rate were exactly delta, a count above it would happen 1 time in 1,000."""
    total, k = 0.0, 0
    while True:
        total += math.comb(n, k) * p ** k * (1 - p) ** (n - k)
        if 1.0 - total <= level:
            return k
        k += 1


def _peaks(draw, streams: int, steps: int, n_calibration: int, seed: int, grid=None, chunk: int = 250):
    """Simulates ``streams`` exchangeable streams (a fresh calibration draw each, then ``steps``
    scores from the same distribution) through the code the monitor runs; returns each stream
    kind's (streams,) peak log martingale."""
    rng = np.random.default_rng(seed)
    peaks = {name: [] for name in STREAMS}
    for start in range(0, streams, chunk):
        c = min(chunk, streams - start)
        calibration = np.stack([draw(rng, c) for _ in range(n_calibration)], 1)  # a new draw per stream
        online = OnlinePValues(calibration, c, grid=grid, rng=rng)
        martingales = {name: ConformalMartingale(c) for name in STREAMS}
        peak = {name: np.zeros(c) for name in STREAMS}
        for _ in range(steps):
            for name, (q, active) in stream_inputs(online.step(draw(rng, c)), 0.05).items():
                martingales[name].step(q, active)
                peak[name] = np.maximum(peak[name], martingales[name].log_value)
        for name in STREAMS:
            peaks[name].append(peak[name])
    return {name: np.concatenate(v) for name, v in peaks.items()}


def _check_guarantee(peaks, streams):
    for name, peak in peaks.items():
        for delta in DELTAS:
            alarms = int((peak >= math.log(1 / delta)).sum())
            assert alarms <= _binomial_upper(streams, delta), (name, delta, alarms)


def test_false_alarms_of_exchangeable_streams_at_most_delta():
    """1,000 streams x 2,000 images, continuous scores: the fraction that ever reaches 1/delta is
    <= delta for every delta, up to binomial slack (at delta 0.01: at most 20 of 1,000)."""
    peaks = _peaks(lambda rng, c: rng.lognormal(3.0, 0.2, c), 1000, 2000, 47, seed=1)
    _check_guarantee(peaks, 1000)
    assert (peaks["all"] > 0).mean() > 0.3  # the martingale does move: a frozen one would pass trivially


def test_false_alarms_with_heavy_ties_and_a_coarse_grid():
    """Integer scores (few distinct values) and bins 50 % wide: ties everywhere, broken at random."""
    peaks = _peaks(lambda rng, c: rng.poisson(3.0, c).astype(float) + 1.0, 1000, 1000, 10, seed=2,
                   grid=ScoreGrid(1.0, 100.0, 0.5))
    _check_guarantee(peaks, 1000)


def test_fixed_calibration_p_values_break_the_guarantee():
    """The check above has power: bet on p-values against one FIXED calibration draw (padim's, smoothed
    so that each one alone is exactly uniform), and far more streams alarm than delta allows, because
    the p-values of one stream share the draw. This is what the online construction fixes."""
    rng = np.random.default_rng(3)
    streams, steps, n = 1000, 500, 20
    calibration, scores = rng.random((streams, n)), rng.random((streams, steps))
    above = (calibration[:, None, :] > scores[:, :, None]).sum(2)
    p = (above + rng.random((streams, steps))) / (n + 1.0)
    assert abs(p.mean() - 0.5) < 0.01 and abs((p < 0.1).mean() - 0.1) < 0.01  # uniform, one by one
    martingale, peak = ConformalMartingale(streams), np.zeros(streams)
    for t in range(steps):
        martingale.step(p[:, t])
        peak = np.maximum(peak, martingale.log_value)
    alarms = int((peak >= math.log(1 / 0.1)).sum())
    assert alarms > 2 * _binomial_upper(streams, 0.1), alarms


def test_online_p_values_uniform_and_independent():
    """20,000 copies of a 30-image stream against 5 calibration scores, with ties: at each step the
    p-values are uniform (Kolmogorov-Smirnov), and consecutive ones uncorrelated; the fixed-calibration
    p-values of the same data are correlated (they share the draw)."""
    rng = np.random.default_rng(4)
    copies, n = 20000, 5
    data = rng.integers(0, 6, (copies, n + 30)).astype(float) + 1.0
    online = OnlinePValues(np.zeros(0), copies, grid=ScoreGrid(0.5, 100.0, 0.01), rng=rng)
    p = np.stack([online.step(data[:, j]) for j in range(n + 30)], 1)[:, n:]
    grid = (np.arange(copies) + 1) / copies
    for t in (0, 1, 10, 29):
        assert np.abs(np.sort(p[:, t]) - grid).max() < 1.63 / math.sqrt(copies)  # KS at 1 %
    assert abs(np.corrcoef(p[:, 0], p[:, 1])[0, 1]) < 0.03
    assert abs(np.corrcoef(p[:, 10], p[:, 29])[0, 1]) < 0.03
    above = (data[:, None, :n] > data[:, n:, None]).sum(2)
    equal = (data[:, None, :n] == data[:, n:, None]).sum(2)
    fixed = (above + rng.random(above.shape) * (equal + 1)) / (n + 1)
    assert np.corrcoef(fixed[:, 0], fixed[:, 1])[0, 1] > 0.1


def test_online_p_value_matches_its_definition():
    """p_t = (#{bag > s} + U #{bag == s}) / (n + t), bag = reference + earlier scores + s, by counting."""
    reference = np.array([1.0, 2.0, 2.0, 5.0])
    stream = np.array([2.0, 3.0, 2.0, 0.5, 9.0, 2.0])
    u_rng, p_rng = np.random.default_rng(5), np.random.default_rng(5)
    online = OnlinePValues(reference, 1, rng=p_rng)
    bag = list(reference)
    for s in stream:
        bag.append(s)
        u = (u_rng.integers(0, 2 ** 53, size=1)[0] + 0.5) / 2 ** 53
        expected = (sum(b > s for b in bag) + u * sum(b == s for b in bag)) / len(bag)
        assert online.step(s)[0] == pytest.approx(expected, rel=1e-12)


def test_rank_counter_against_brute_force():
    rng = np.random.default_rng(6)
    counter, n_bins = RankCounter(37, copies=3), 37
    reference = rng.integers(0, n_bins, 11)
    counter.fill(reference)
    assert list(counter.below(np.full(3, n_bins))) == [11] * 3
    reference = rng.integers(0, n_bins, (3, 11))  # one bag per copy
    counter.fill(reference)
    bags = [list(row) for row in reference]
    for _ in range(300):
        keys, mask = rng.integers(0, n_bins, 3), rng.random(3) < 0.7
        query = rng.integers(0, n_bins + 1, 3)
        assert list(counter.below(query)) == [sum(b < q for b in bag) for bag, q in zip(bags, query)]
        counter.add(keys, mask)
        for bag, k, m in zip(bags, keys, mask):
            if m:
                bag.append(k)
    assert list(counter.total) == [len(b) for b in bags]


def test_grid_is_monotone_and_bounded():
    grid = ScoreGrid()
    s = np.sort(np.random.default_rng(7).lognormal(2.0, 3.0, 5000))
    keys = grid.keys(s)
    assert np.all(np.diff(keys) >= 0) and keys.min() >= 0 and keys.max() < grid.n_bins
    assert grid.keys(np.array([-5.0, 0.0, np.inf]))[[0, 1]].tolist() == [0, 0]
    assert grid.keys(np.array([np.inf]))[0] == grid.n_bins - 1
    a, b = grid.keys(np.array([20.0, 20.0 * 1.0021]))
    assert b > a  # 0.1 % bins: scores 0.2 % apart differ
    assert grid.n_bins * 8 < 200_000  # the bag's memory, whatever the traffic


def test_martingale_stable_over_many_steps_and_extreme_p():
    martingale = ConformalMartingale(2)
    rng = np.random.default_rng(8)
    for _ in range(20000):
        martingale.step(rng.random(2) * (1 - 1e-12) + 5e-13)
    assert np.all(np.isfinite(martingale.log_value))
    assert np.all(martingale.log_value >= _log_cash(np.array(20000.0)) - 1e-9)  # never below the cash kept
    martingale.step(np.array([1e-300, 1 - 1e-16]))
    assert np.all(np.isfinite(martingale.log_value))
    # pi(t) = G(t) - G(t + 1), G(t) = ln 2 / ln(t + 2), in 60-digit decimals (no cancellation there)
    getcontext().prec = 60
    for t in (0, 1, 1000, 10 ** 6, 10 ** 12, 10 ** 15):
        pi = Decimal(2).ln() * (1 / Decimal(t + 2).ln() - 1 / Decimal(t + 3).ln())
        assert _log_restart_weight(np.array(float(t))) == pytest.approx(float(pi.ln()), rel=1e-9)
        cash = Decimal(2).ln() / Decimal(t + 2).ln()
        assert _log_cash(np.array(float(t))) == pytest.approx(float(cash.ln()), rel=1e-12)


def test_shifted_p_values_alarm_within_a_bound():
    """p ~ Beta(0.5, 1) (small p too often): 300 streams, median images until 1/0.01 at most 40, all
    within 300. Uniform p, same code: none of them alarms in 300 (only 1 % may ever)."""
    rng = np.random.default_rng(9)
    for p, bound in ((rng.beta(0.5, 1.0, (300, 300)), 40), (rng.random((300, 300)), None)):
        martingale, first = ConformalMartingale(300), np.full(300, -1)
        for t in range(300):
            martingale.step(p[:, t])
            first = np.where((first < 0) & (martingale.log_value >= math.log(100)), t + 1, first)
        if bound is None:
            assert (first > 0).mean() <= 0.03
        else:
            assert np.all(first > 0) and np.median(first) <= bound, np.median(first)


def _until(monitor, stream, batch=10):
    found = {}
    for i in range(0, len(stream), batch):
        state = monitor.update(stream[i:i + batch])
        for name in state["new_alarms"]:
            found[name] = state["streams"][name]["alarm_since"]["image"]
    return found


def test_monitor_alarms_on_shifted_scores_after_a_calm_period():
    """200 calibration scores N(20, 2); 1,000 calm images; then +1 sd (a brighter lamp): both streams
    alarm after the change (all of 10 monitors, "all" in at most 150 images), none while calm."""
    delays = []
    for seed in range(10):
        rng = np.random.default_rng(100 + seed)
        monitor = DriftMonitor(rng.normal(20, 2, 200), seed=seed)
        found = _until(monitor, np.concatenate([rng.normal(20, 2, 1000), rng.normal(22, 2, 600)]))
        assert set(found) == {"all", "good"} and min(found.values()) >= 1000, found
        delays.append(found["all"] - 1000)
    assert np.median(delays) <= 150, delays


def test_good_stream_separates_more_defects_from_a_changed_picture():
    """After 1,000 calm images at 2 % defects (scores far above), defects at 20 %: "all" alarms, "good"
    does not; a shift of the good images' scores instead: "good" alarms too."""
    more_defects, changed = [], []
    for seed in range(8):
        rng = np.random.default_rng(200 + seed)

        def line(n, rate, shift=0.0):
            return np.where(rng.random(n) < rate, rng.normal(40, 4, n), rng.normal(20 + shift, 2, n))

        monitor = DriftMonitor(rng.normal(20, 2, 200), seed=seed)
        more_defects.append(_until(monitor, np.concatenate([line(1000, 0.02), line(600, 0.2)])))
        monitor = DriftMonitor(rng.normal(20, 2, 200), seed=seed)
        changed.append(_until(monitor, np.concatenate([line(1000, 0.02), line(600, 0.02, shift=2.0)])))
    assert all("all" in f for f in more_defects) and sum("good" in f for f in more_defects) <= 1, more_defects
    assert all("good" in f for f in changed), changed


def test_monitor_is_the_simulated_code():
    """DriftMonitor for one copy gives the same martingales as the vectorised classes the simulations
    step (same seed), so what the simulations measure is what the service runs."""
    rng = np.random.default_rng(10)
    reference, stream = rng.normal(20, 2, 50), rng.normal(21, 2, 300)
    monitor = DriftMonitor(reference, seed=11)
    online = OnlinePValues(reference, 1, rng=np.random.default_rng(11))
    martingales = {n: ConformalMartingale(1) for n in STREAMS}
    for i in range(0, 300, 7):
        state = monitor.update(stream[i:i + 7])
    for s in stream:
        for name, (q, active) in stream_inputs(online.step(s), 0.05).items():
            martingales[name].step(q, active)
    for name in STREAMS:
        expected = martingales[name].log_value[0] / math.log(10)
        assert state["streams"][name]["martingale"]["log10"] == pytest.approx(expected)
        assert state["streams"][name]["images_seen"] == martingales[name].steps[0]


def test_state_reset_and_json():
    rng = np.random.default_rng(12)
    times = iter(f"2030-01-01T00:00:{i:02d}+00:00" for i in range(60))

    class Clock:
        def isoformat(self):
            return next(times)

    monitor = DriftMonitor(rng.normal(20, 2, 100), delta=0.01, seed=0, clock=Clock)
    state = monitor.update(np.concatenate([rng.normal(20, 2, 50), [np.nan], rng.normal(60, 1, 50)]))
    json.dumps(state, allow_nan=False)
    assert state["images_seen"] == 100 and state["skipped"] == 1 and state["alarm"]
    assert state["new_alarms"] and "new_alarms" not in monitor.state()
    everything = state["streams"]["all"]
    assert everything["alarm"] and everything["threshold"] == 100.0 and everything["stream"] == "all"
    assert everything["alarm_since"]["time"].startswith("2030") and 50 <= everything["alarm_since"]["image"] < 100
    assert everything["martingale"]["log10"] >= 2 and everything["martingale"]["value"] == pytest.approx(
        10 ** everything["martingale"]["log10"])
    assert monitor.update([65.0])["new_alarms"] == []  # latched: no second alarm
    state = monitor.reset()
    assert not state["alarm"] and state["images_seen"] == 0 and state["streams"]["all"]["martingale"]["log10"] == 0
    assert state["streams"]["all"]["alarms_total"] == 1 and state["streams"]["all"]["alarm_since"] is None
    assert monitor.reset(rng.normal(60, 1, 30))["reference_images"] == 30  # recalibrated
    assert not monitor.update(rng.normal(60, 1, 40))["alarm"]
    assert monitor.state()["reference_images"] == 30


@pytest.mark.parametrize("kwargs, words", [
    ({"delta": 0}, "delta must be in (0, 1)"), ({"delta": 1.0}, "delta"), ({"delta": float("nan")}, "delta"),
    ({"delta": True}, "delta"), ({"target_fpr": 1.5}, "target_fpr must be in (0, 1)"),
])
def test_settings_are_validated(kwargs, words):
    with pytest.raises(DriftError, match=words.replace("(", r"\(").replace(")", r"\)")) as caught:
        DriftMonitor(np.ones(5), **kwargs)
    assert isinstance(caught.value, PadimError) and "\n" not in str(caught.value) and "--" not in str(caught.value)


def test_inputs_are_validated():
    with pytest.raises(DriftError, match="calibration_scores must be a 1-D"):
        DriftMonitor(np.ones((3, 2)))
    with pytest.raises(DriftError, match="finite"):
        DriftMonitor(np.array([1.0, np.nan]))
    with pytest.raises(DriftError, match="scores must be a 1-D"):
        DriftMonitor(np.ones(5)).update(np.ones((2, 2)))
    with pytest.raises(DriftError, match="bet"):
        ConformalMartingale(1, [("rate", 0.5, 3.0)])
    assert DriftMonitor(np.zeros(0)).update([1.0, 2.0])["images_seen"] == 2  # no calibration: valid, weak


def test_threads_share_one_monitor():
    rng = np.random.default_rng(13)
    monitor = DriftMonitor(rng.normal(20, 2, 100), seed=1)
    batches = [rng.normal(20, 2, 25) for _ in range(80)]
    errors = []

    def work(part):
        try:
            for b in part:
                monitor.update(b)
        except Exception as exc:  # noqa: BLE001 - the assertion below reports it
            errors.append(exc)

    threads = [threading.Thread(target=work, args=(batches[i::8],)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    state = monitor.state()
    assert not errors and state["images_seen"] == 2000 and state["streams"]["all"]["images_seen"] == 2000
    assert int(monitor._p.bag.total[0]) == 2100


def test_no_torch():
    """The module works where torch is not installed: importing it imports no torch."""
    import subprocess

    code = "import sys, padim.monitor; padim.monitor.DriftMonitor([1.0]); assert 'torch' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True)
