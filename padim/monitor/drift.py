"""Drift alarms with a guarantee: a conformal test martingale over the stream of image scores.

What it tests. H0: the reference images (padim's calibration images) and every image scored since
are exchangeable (same line, lighting, camera, defect rate). Each new score becomes an *online*
conformal p-value; the monitor bets that those are not uniform and alarms when its capital M_t
reaches 1 / delta. Under H0, M is a nonnegative martingale with M_0 = 1, so by Ville's inequality
P(sup_t M_t >= 1 / delta) <= delta: the alarm is false with probability at most delta, however long
the line runs (Vovk, Nouretdinov, Gammerman, "Testing exchangeability on-line", ICML 2003; Vovk,
"Testing randomness online", Statistical Science 2021).

Why not padim's own p-values. ``Calibration.p_values`` compares a score with a FIXED set of n
calibration scores: given the draw, test images' p-values are i.i.d. but not uniform (a calibration
set that happened to score low makes every p-value small), and a martingale on them grows with no
drift at all (tests/test_drift.py measures it). The online construction compares the t-th new
score s with the bag of the n reference scores, the t - 1 scores before it and s itself:

    p_t = (#{bag > s} + U_t * #{bag == s}) / (n + t),   U_t ~ Uniform(0, 1),   #{bag == s} >= 1

Under H0, p_1, p_2, ... are i.i.d. Uniform(0, 1) exactly, ties included (Vovk et al. 2003).

Bounded memory for months of traffic. Scores are binned on a FIXED log-spaced grid (``ScoreGrid``:
bins 0.1 % wide from 1e-3 to 1e6, scores outside in the end bins) and the bag is a count per bin in
a Fenwick tree: 20,734 bins x 8 bytes = 166 kB and O(log bins) per image, whatever the traffic. No
cap and no loss of validity: a conformal p-value is exact for ANY score function that treats the
bag symmetrically, and "the bin of the score" is one (ties are broken by U_t). Binning only costs
resolution: scores 0.1 % apart tie. The grid must not depend on the calibration scores (that would
break the symmetry), hence fixed bounds.

The bets (``ConformalMartingale``). A bet is a density f on [0, 1]: the capital on it is multiplied
by f(p_t), an expected factor of 1 under H0. Beta(a, 1) densities (a < 1) win on small p (scores
higher than before: picture changes, defects), Beta(1, b) on large p (lower scores), Beta(2, 2) on p
bunched in the middle (scores less spread: blur); "rate" bets f = k on p < c, (1 - k c) / (1 - c)
above, win when k times more images than before fall in the top c of the bag (a defect rate up k
times). A mixture of test martingales is one. A line runs calm for months before something changes,
and a martingale that bet all along has lost nearly everything by then (the simple mixture falls
like t^-1/2 and needs thousands of images to recover; a fixed-rate "jumper" loses a fraction J per
image). So the mixture is also over the image tau where betting starts: pi(tau) = G(tau) - G(tau + 1),
G(t) = 1 / log2(t + 2), is staked at image tau and G(t) is kept as cash. A change after T calm images
costs log(1 / pi(T)) nats: 1 at the start, 11 after 1,000 images, 19 after 10^6 (log(1 / delta) is
4.6 at delta = 0.01). The family was chosen on the real streams of benchmarks/drift.py against the
alternatives tried while building it (adding Beta(0.1, 1) or Beta(0.5, 0.5), bets learned from a
window of recent p-values, histogram or power): none alarmed sooner.

What no valid test can do: the bag absorbs the new images, so the evidence against n reference
images is bounded however long the stream runs (about what a two-sample test of the n scores against
infinitely many new ones gives). Against elpv_mono's 47 calibration images, brightness +20 % or 15 %
defects from the first image go undetected at 0.01; after 1,000 calm images in the bag, brightness
alarms in ~50. What matters is the history the bag accumulates (do not reset without cause).

Two streams:
- "all": every image; alarms on more defects than in the reference AND on picture changes.
- "good": the images whose online p_t > target_fpr (they look good next to all seen so far), with
  p rescaled to (p_t - target_fpr) / (1 - target_fpr). Under H0 the p_t are i.i.d. uniform and each
  selection depends on its own p_t only, so the selected ones, rescaled, are i.i.d. uniform: a
  valid test of its own. Extra defects bring mostly small p, which it leaves out, so it moves little
  when the defect rate rises and alarms when the bulk of the scores moves: "all" without "good"
  says more defects; both say the picture changed. Each stream: false alarm <= delta; either: <= 2 delta.

The reference is padim's held-out good images (defect rate 0), so a line that always makes some
defects differs from it from day one; ``reference_scores`` (a production sample, defects included)
tests for change relative to that instead. Cross-fitted calibration (``calibration="cv"``) scores
come from fold models, not the final one: only approximately exchangeable; use holdout.

Shapes: C independent copies (1 in the service, many in simulations); K bets.
"""

from __future__ import annotations

import math
import numbers
import threading
from datetime import datetime, timezone
from typing import Callable, Optional, Sequence, Tuple

import numpy as np

from padim.settings.calibration import DEFAULT_TARGET_FPR
from padim.errors import PadimError

DEFAULT_DELTA = 0.01
STREAMS = ("all", "good")
# ("beta", a, b): the Beta(a, b) density; ("rate", c, k): k on [0, c), (1 - k c) / (1 - c) on [c, 1]. Equal weights.
BETS: Tuple[Tuple[str, float, float], ...] = (("beta", 0.25, 1.0), ("beta", 0.5, 1.0), ("beta", 0.75, 1.0),
                                              ("beta", 1.0, 0.5), ("beta", 2.0, 2.0), ("rate", 0.05, 3.0),
                                              ("rate", 0.05, 6.0))
_U_STEPS = 2 ** 53  # U_t = (k + 0.5) / 2^53: uniform on (0, 1) open, so p_t is never 0 or 1 (log f stays finite)


class DriftError(PadimError):
    """A drift monitor was given a setting or an input it cannot use."""


class ScoreGrid:
    """A fixed monotone binning of scores: bin k holds [low (1 + resolution)^k, low (1 + resolution)^(k+1));
    scores below ``low`` (zero, negative) go to bin 0, above ``high`` (and +inf) to the last bin."""

    def __init__(self, low: float = 1e-3, high: float = 1e6, resolution: float = 1e-3):
        if not (math.isfinite(low) and math.isfinite(high) and 0.0 < low < high):
            raise DriftError(f"grid low and high must be finite with 0 < low < high, got low={low}, high={high}")
        if not 0.0 < resolution < 1.0:
            raise DriftError(f"grid resolution must be in (0, 1), got {resolution}")
        self.low, self.high, self.resolution = float(low), float(high), float(resolution)
        self._step = math.log1p(resolution)
        self.n_bins = int(math.ceil(math.log(high / low) / self._step)) + 1

    def keys(self, scores) -> np.ndarray:
        """(C,) scores (not NaN) -> (C,) int64 bins in [0, n_bins)."""
        s = np.maximum(np.asarray(scores, dtype=np.float64), self.low)
        with np.errstate(over="ignore", invalid="ignore"):
            k = np.floor(np.log(s / self.low) / self._step)
        return np.clip(np.nan_to_num(k, posinf=self.n_bins - 1), 0, self.n_bins - 1).astype(np.int64)


class RankCounter:
    """C bags of binned scores: how many lie below a bin, and insertion, in O(log n_bins) each.

    A Fenwick (binary indexed) tree of counts per bin, one row per bag. Written here because it must
    run vectorised over independent bags (simulations step 1,000 bags at once) with NumPy alone; a
    sorted list per bag would be a Python call per score and bag, and memory growing with traffic.
    A query or insertion gathers its tree nodes (one per bit) at once: a few NumPy calls, not ~50.
    """

    def __init__(self, n_bins: int, copies: int = 1):
        self.n_bins = n_bins
        self._tree = np.zeros((copies, n_bins + 2), dtype=np.int64)  # 1-based; column n_bins + 1 is a sink
        self._rows = np.arange(copies)[:, None]
        self._bits = np.arange((n_bins + 1).bit_length() + 1, dtype=np.int64)
        self._below_bit = (np.int64(1) << self._bits) - 1
        self.total = np.zeros(copies, dtype=np.int64)

    def fill(self, keys: np.ndarray) -> None:
        """The bags := the scores of these bins, (M,) for every bag or (C, M) one row per bag; built
        in O(n_bins) per bag from the prefix sums."""
        keys = np.asarray(keys, dtype=np.int64)
        rows = np.broadcast_to(keys, (len(self.total), keys.shape[-1]))
        offsets = (np.arange(len(self.total)) * self.n_bins)[:, None]
        counts = np.bincount((rows + offsets).ravel(), minlength=len(self.total) * self.n_bins)
        prefix = np.concatenate([np.zeros((len(self.total), 1), np.int64),
                                 np.cumsum(counts.reshape(len(self.total), self.n_bins), axis=1)], axis=1)
        i = np.arange(1, self.n_bins + 1)
        self._tree[:, 1:self.n_bins + 1] = prefix[:, i] - prefix[:, i - (i & -i)]
        self.total[:] = keys.shape[-1]

    def below(self, keys: np.ndarray) -> np.ndarray:
        """(C,) bins in [0, n_bins] -> (C,) counts of each bag's scores in lower bins. The prefix sum
        over tree nodes i with its lowest set bits cleared one by one: i & ~(2^l - 1) for each set bit l."""
        i = np.asarray(keys, dtype=np.int64)[:, None]
        nodes = np.where((i >> self._bits) & 1 == 1, i & ~self._below_bit, 0)  # node 0 is always 0
        return self._tree[self._rows, nodes].sum(axis=1)

    def add(self, keys: np.ndarray, mask: np.ndarray) -> None:
        """Adds score bin keys[c] to bag c where mask[c]. The nodes covering index i: for each level
        l, the multiple q 2^l >= i with q = ceil(i / 2^l), if q is odd (then its range holds i)."""
        i = np.asarray(keys, dtype=np.int64)[:, None] + 1
        q = (i + self._below_bit) >> self._bits
        nodes = q << self._bits
        nodes = np.where((q & 1 == 1) & (nodes <= self.n_bins), nodes, self.n_bins + 1)  # others: the sink
        inc = np.asarray(mask, dtype=np.int64)
        self._tree[self._rows, nodes] += inc[:, None]  # distinct nodes per row, but for the sink
        self.total += inc


class OnlinePValues:
    """Online smoothed conformal p-values for C copies of a stream, each against its own growing bag
    (the reference scores, (n,) for all copies or (C, n) one row each, then every score it was
    given). i.i.d. Uniform(0, 1) under H0."""

    def __init__(self, reference_scores, copies: int = 1, grid: Optional[ScoreGrid] = None,
                 rng: Optional[np.random.Generator] = None):
        self.grid = grid or ScoreGrid()
        self.bag = RankCounter(self.grid.n_bins, copies)
        self.bag.fill(self.grid.keys(np.asarray(reference_scores, dtype=np.float64)))
        self._rng = rng if rng is not None else np.random.default_rng()

    def step(self, scores) -> np.ndarray:
        """(C,) scores, one per copy -> (C,) p-values in (0, 1), each score then joining its bag.
        A NaN score gets p NaN and is not added."""
        s = np.broadcast_to(np.asarray(scores, dtype=np.float64), self.bag.total.shape)
        ok = ~np.isnan(s)
        keys = self.grid.keys(np.where(ok, s, self.grid.low))
        below, upto, n = self.bag.below(keys), self.bag.below(keys + 1), self.bag.total
        u = (self._rng.integers(0, _U_STEPS, size=len(keys)) + 0.5) / _U_STEPS
        p = (n - upto + u * (upto - below + 1)) / (n + 1.0)  # the new score ties with itself: + 1
        self.bag.add(keys, ok)
        return np.where(ok, p, np.nan)


def _log_cash(t: np.ndarray) -> np.ndarray:
    """log G(t), G(t) = 1 / log2(t + 2): the capital not yet staked after t images (G(0) = 1)."""
    return -np.log(np.log2(t + 2.0))


def _log_restart_weight(t: np.ndarray) -> np.ndarray:
    """log pi(t), pi(t) = G(t) - G(t + 1) = log2(1 + 1/(t + 2)) / (log2(t + 2) log2(t + 3)), stable for large t."""
    return np.log(np.log1p(1.0 / (t + 2.0)) / math.log(2.0)) - np.log(np.log2(t + 2.0)) - np.log(np.log2(t + 3.0))


class ConformalMartingale:
    """M_t = G(t) + sum_{tau < t} pi(tau) sum_k w_k prod_{tau < i <= t} f_k(p_i), for C copies, in log space
    (stable for any number of steps: capitals of 1e-10^6 or 1e+10^6 are just logs).

    f_k: the densities of ``bets`` (see ``BETS``), w_k = 1 / K. Under H0 (p i.i.d. uniform) it is a
    test martingale (M_0 = G(0) = 1; each term has expectation 1; the weights sum to 1), so
    P(ever M_t >= 1 / delta) <= delta (Ville).
    """

    def __init__(self, copies: int = 1, bets: Sequence[Tuple[str, float, float]] = BETS):
        bets = list(bets)
        for kind, x, y in bets:
            if not ((kind == "beta" and x > 0 and y > 0) or (kind == "rate" and 0 < x < 1 and 0 < x * y < 1)):
                raise DriftError(f"bet {(kind, x, y)!r} is not ('beta', a > 0, b > 0) or "
                                 "('rate', 0 < c < 1, k with 0 < k c < 1)")
        if not bets:
            raise DriftError("bets must not be empty")
        beta = np.array([[x, y] for kind, x, y in bets if kind == "beta"], dtype=np.float64).reshape(-1, 2)
        rate = np.array([[x, y] for kind, x, y in bets if kind == "rate"], dtype=np.float64).reshape(-1, 2)
        self._a1, self._b1 = beta[:, 0] - 1.0, beta[:, 1] - 1.0
        self._log_beta = np.array([math.lgamma(x) + math.lgamma(y) - math.lgamma(x + y) for x, y in beta])
        self._cut, self._log_in = rate[:, 0], np.log(rate[:, 1])
        self._log_out = np.log1p(-rate[:, 0] * rate[:, 1]) - np.log1p(-rate[:, 0])
        self._log_w = -math.log(len(bets))
        self._stake = np.full((copies, len(bets)), -np.inf)  # log capital on each bet (Beta ones first)
        self.steps = np.zeros(copies, dtype=np.int64)
        self.log_value = np.zeros(copies)  # natural log of M_t

    def step(self, p, active=None) -> None:
        """Bets on p (C,) in (0, 1) for the copies where ``active`` (default: all) and p is not NaN."""
        p = np.asarray(p, dtype=np.float64)
        on = ~np.isnan(p) if active is None else (np.asarray(active, dtype=bool) & ~np.isnan(p))
        if not on.any():
            return
        t, q = self.steps[on], p[on][:, None]
        stake = np.logaddexp(self._stake[on], (_log_restart_weight(t) + self._log_w)[:, None])
        stake += np.concatenate([self._a1 * np.log(q) + self._b1 * np.log1p(-q) - self._log_beta,
                                 np.where(q < self._cut, self._log_in, self._log_out)], axis=1)
        self._stake[on] = stake
        self.steps[on] = t + 1
        self.log_value[on] = np.logaddexp(np.logaddexp.reduce(stake, axis=1), _log_cash(t + 1))


def stream_inputs(p: np.ndarray, target_fpr: float) -> dict:
    """Online p-values (C,) -> {stream: (its p-values (C,), active (C,) bool)} for "all" and "good"
    (p > target_fpr, rescaled to (p - target_fpr) / (1 - target_fpr): uniform again under H0)."""
    good = p > target_fpr
    return {"all": (p, ~np.isnan(p)), "good": (np.where(good, (p - target_fpr) / (1.0 - target_fpr), np.nan), good)}


def _now() -> datetime:
    return datetime.now(timezone.utc)


class DriftMonitor:
    """Drift alarms for one served model (or one ``padim predict`` run): streams "all" and "good".

    calibration_scores: (n,) the model's calibration image scores (``model.calibration_.image_scores``);
    delta: false-alarm probability per stream, in (0, 1), alarm at M >= 1 / delta;
    target_fpr: the "good" stream's cut on the online p-value (the model's target FPR);
    seed: of the tie-breaking U_t (numpy Generator); reference_scores: replace the calibration scores as
    the reference (e.g. a production sample with its usual defects); grid, bets: see the module doc;
    clock: returns the timezone-aware time of an alarm (tests).

    Thread-safe: ``update``, ``state`` and ``reset`` hold one lock (the service calls from workers).
    An alarm latches until ``reset``; the martingale keeps moving and is reported as it is.
    """

    def __init__(self, calibration_scores, delta: float = DEFAULT_DELTA, target_fpr: float = DEFAULT_TARGET_FPR,
                 seed: Optional[int] = None, *, reference_scores=None, grid: Optional[ScoreGrid] = None,
                 bets: Sequence[Tuple[str, float, float]] = BETS, clock: Callable[[], datetime] = _now):
        for name, value in (("delta", delta), ("target_fpr", target_fpr)):
            if isinstance(value, bool) or not (isinstance(value, numbers.Real) and 0.0 < value < 1.0):
                raise DriftError(f"{name} must be in (0, 1), got {value!r}")
        self.delta, self.target_fpr = float(delta), float(target_fpr)
        self._grid, self._bets, self._clock = grid or ScoreGrid(), tuple(bets), clock
        self._rng, self._lock = np.random.default_rng(seed), threading.Lock()
        self._alarms_total = dict.fromkeys(STREAMS, 0)
        self._reset(calibration_scores if reference_scores is None else reference_scores)

    @staticmethod
    def _scores(values, name: str) -> np.ndarray:
        scores = np.asarray(values, dtype=np.float64)
        if scores.ndim != 1:
            raise DriftError(f"{name} must be a 1-D array of image scores, got shape {scores.shape}")
        return scores

    def _reset(self, reference) -> None:
        reference = self._scores(reference, "calibration_scores")
        if not np.all(np.isfinite(reference)):
            raise DriftError("calibration_scores must be finite numbers")
        self._reference = reference
        self._p = OnlinePValues(reference, 1, self._grid, self._rng)
        self._martingales = {name: ConformalMartingale(1, self._bets) for name in STREAMS}
        self._max, self._since = dict.fromkeys(STREAMS, 0.0), dict.fromkeys(STREAMS)
        self._seen = self._skipped = 0

    def reset(self, calibration_scores=None) -> dict:
        """Starts over: martingales at 1, no alarm, the bag back to the reference (or to these new
        calibration scores after a recalibration). Returns the state."""
        with self._lock:
            self._reset(self._reference if calibration_scores is None else calibration_scores)
            return self._state()

    def update(self, scores) -> dict:
        """Feeds a batch of image scores (k,), in arrival order; NaN scores are skipped (counted).
        Returns the state, plus "new_alarms": the streams whose alarm fired in this batch."""
        scores = self._scores(scores, "scores")
        with self._lock:
            new, limit = [], math.log(1.0 / self.delta)
            for score in scores:
                if math.isnan(score):
                    self._skipped += 1
                    continue
                for name, (q, active) in stream_inputs(self._p.step(score), self.target_fpr).items():
                    self._martingales[name].step(q, active)
                for name, martingale in self._martingales.items():
                    value = float(martingale.log_value[0])
                    self._max[name] = max(self._max[name], value)
                    if self._since[name] is None and value >= limit:
                        self._since[name] = {"time": self._clock().isoformat(), "image": self._seen}
                        self._alarms_total[name] += 1
                        new.append(name)
                self._seen += 1
            state = self._state()
        state["new_alarms"] = new
        return state

    def state(self) -> dict:
        """JSON-ready (no NaN, no infinity): {"delta", "threshold" (1 / delta), "target_fpr",
        "reference_images", "images_seen", "skipped" (NaN scores), "alarm" (either stream), "streams":
        {"all" | "good": {"stream", "delta", "threshold", "martingale": {"log10", "value" (None above
        1e300)}, "max_log10" (since reset), "images_seen" (by this stream), "alarm", "alarm_since":
        {"time" (ISO 8601), "image" (0-based, among all images since reset)} or None, "alarms_total"
        (since construction: a counter)}}}."""
        with self._lock:
            return self._state()

    def _stream_state(self, name: str) -> dict:
        log10 = float(self._martingales[name].log_value[0]) / math.log(10.0)
        return {"stream": name, "delta": self.delta, "threshold": 1.0 / self.delta,
                "martingale": {"log10": log10, "value": 10.0 ** log10 if log10 < 300 else None},
                "max_log10": self._max[name] / math.log(10.0),
                "images_seen": int(self._martingales[name].steps[0]),
                "alarm": self._since[name] is not None, "alarm_since": self._since[name],
                "alarms_total": self._alarms_total[name]}

    def _state(self) -> dict:
        streams = {name: self._stream_state(name) for name in STREAMS}
        return {"delta": self.delta, "threshold": 1.0 / self.delta, "target_fpr": self.target_fpr,
                "reference_images": int(len(self._reference)), "images_seen": self._seen,
                "skipped": self._skipped, "alarm": any(s["alarm"] for s in streams.values()), "streams": streams}
