"""Privacy accounting of DP-SGD with Google's ``dp-accounting`` (RDP and PLD accountants).

DP-SGD with Poisson subsampling at rate ``q`` (each example in each batch independently with
probability ``q``), Gaussian noise of standard deviation ``noise_multiplier * C`` on the sum of
per-example gradients clipped to norm ``C``, run for ``steps`` steps, is ``(epsilon, delta)``
differentially private under add-or-remove-one adjacency. ``epsilon`` depends only on
``(noise_multiplier, sampling_rate, steps, delta)``; it assumes Poisson subsampling (fixed-size
shuffled batches are an approximation that the accountants do not cover exactly) and that nothing
else (hyperparameter search, a non-private pretraining on the same data) touches the data.

Two accountants: ``"rdp"`` (Renyi DP, Mironov 2017; Abadi et al. 2016's moments accountant, the
one Opacus and TF Privacy report by default) and ``"pld"`` (privacy loss distributions, tighter:
a smaller epsilon for the same run, and slower). Both are dp-accounting's own: the RDP one at its
default orders, the PLD one with the privacy loss discretized at ``min(1e-3, q / (3.5 sigma))``.
One step's privacy loss spreads over about ``q / sigma``, and a grid coarser than that rounds it
up (pessimistically) by a large part of its size: at a fixed 1e-3, epsilon came out 2.7x too
large at sigma 8, q 0.001 (above RDP's), and at dp-accounting's default 1e-4 still 27% too large
at sigma 2, q 1e-4. At this grid it stays within 1% above a 30x finer one (sigma 0.6 to 8, q 1e-4
to 1, 10 to 100,000 steps, epsilon above 1e-4); where ``q / sigma`` is large it is the coarse
1e-3, ten times faster than dp-accounting's default.

Needs ``pip install "jcnn[dp]"`` (the ``dp-accounting`` package).
"""

from __future__ import annotations

import contextlib
import logging
import math

from jcnn.functional._checks import check_int, check_real

__all__ = ["dp_epsilon", "dp_noise_multiplier"]

_ACCOUNTANTS = ("rdp", "pld")
# Noise multipliers searched by ``dp_noise_multiplier``: above this, a target is unreachable.
_MAX_NOISE_MULTIPLIER = 1e3
# Below this, the search stops (and returns it): such targets need no accounting (and PLD's
# discretization of the privacy loss would need too much memory).
_MIN_NOISE_MULTIPLIER = 0.1


def _dp_accounting():
    try:
        import dp_accounting
    except ImportError as error:  # pragma: no cover - depends on the installation
        raise ImportError(
            "privacy accounting needs the dp-accounting package: pip install 'jcnn[dp]'"
        ) from error
    return dp_accounting


def _real(value, name: str) -> float:
    # the ranges are checked by the callers, which allow inf where it has a meaning
    return check_real(value, name, finite=False)


def _check(sampling_rate, steps, delta, accountant) -> tuple[float, int, float]:
    sampling_rate = _real(sampling_rate, "sampling_rate")
    if not 0 < sampling_rate <= 1:
        raise ValueError(f"sampling_rate: expected a value in (0, 1], got {sampling_rate!r}")
    steps = check_int(steps, "steps", low=0)
    delta = _real(delta, "delta")
    if not 0 < delta < 1:
        raise ValueError(f"delta: expected a value in (0, 1), got {delta!r}")
    if accountant not in _ACCOUNTANTS:
        raise ValueError(f"accountant: expected one of {_ACCOUNTANTS}, got {accountant!r}")
    return sampling_rate, int(steps), delta


class _DropUnconvergedOrderWarnings(logging.Filter):
    """dp-accounting's RDP accountant leaves out a Renyi order whose series does not converge
    (small noise multipliers, which ``dp_noise_multiplier``'s search tries) and logs a warning for
    each. Leaving an order out can only raise epsilon, so the result is still an upper bound: the
    warnings tell the user nothing to act on. At very large noise multipliers (1e9) each order's
    divergence, about ``q^2 alpha / sigma^2``, rounds to a negative ``-1e-15`` that dp-accounting
    takes as 0 with a warning per order (dozens per call): dropped too."""

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        return "failed to converge" not in message and "Negative Renyi divergence" not in message


@contextlib.contextmanager
def _quiet_accounting():
    logger = logging.getLogger("absl")
    quiet = _DropUnconvergedOrderWarnings()
    logger.addFilter(quiet)
    try:
        yield
    finally:
        logger.removeFilter(quiet)


# PLD's discretization interval: at most this, and at most a step's loss scale q / sigma over
# this many points (see the module docstring)
_PLD_INTERVAL = 1e-3
_PLD_POINTS_PER_LOSS_SCALE = 3.5


def _make_accountant(accountant: str, noise_multiplier: float, sampling_rate: float):
    dp_accounting = _dp_accounting()
    if accountant == "rdp":
        return dp_accounting.rdp.RdpAccountant()
    interval = min(_PLD_INTERVAL, sampling_rate / (_PLD_POINTS_PER_LOSS_SCALE * noise_multiplier))
    return dp_accounting.pld.PLDAccountant(value_discretization_interval=interval)


def _event(noise_multiplier: float, sampling_rate: float, steps: int):
    dp_accounting = _dp_accounting()
    return dp_accounting.SelfComposedDpEvent(
        dp_accounting.PoissonSampledDpEvent(
            sampling_rate, dp_accounting.GaussianDpEvent(noise_multiplier)
        ),
        steps,
    )


def dp_epsilon(
    noise_multiplier: float,
    sampling_rate: float,
    steps: int,
    delta: float,
    *,
    accountant: str = "rdp",
) -> float:
    """The ``epsilon`` of ``steps`` DP-SGD steps at ``delta`` (see the module docstring).

    Args:
      noise_multiplier: ``sigma`` >= 0, the noise standard deviation over the clip norm
        (0 gives ``inf``: no privacy).
      sampling_rate: ``q`` in (0, 1], the probability of each example to be in a batch
        (expected batch size / dataset size).
      steps: the number of noisy steps taken (an int >= 0; 0 gives 0).
      delta: in (0, 1), typically below 1 / dataset size.
      accountant: ``"rdp"`` (default, as Opacus and TF Privacy report) or ``"pld"`` (tighter).

    Returns:
      ``epsilon`` (a float, ``inf`` without noise).

    >>> round(dp_epsilon(1.1, 256 / 60000, 14062, 1e-5), 2)  # 60 epochs of MNIST, batch 256
    2.6
    """
    sampling_rate, steps, delta = _check(sampling_rate, steps, delta, accountant)
    noise_multiplier = _real(noise_multiplier, "noise_multiplier")
    if not 0 <= noise_multiplier < math.inf:
        raise ValueError(
            f"noise_multiplier: expected a finite number >= 0, got {noise_multiplier!r}"
        )
    if steps == 0:
        return 0.0
    if noise_multiplier == 0:
        return math.inf
    account = _make_accountant(accountant, noise_multiplier, sampling_rate)
    with _quiet_accounting():
        account.compose(_event(noise_multiplier, sampling_rate, steps))
        return float(account.get_epsilon(delta))


def dp_noise_multiplier(
    target_epsilon: float,
    sampling_rate: float,
    steps: int,
    delta: float,
    *,
    accountant: str = "rdp",
) -> float:
    """The smallest noise multiplier whose ``dp_epsilon`` is at most ``target_epsilon``.

    Args:
      target_epsilon: the wanted ``epsilon`` > 0.
      sampling_rate, steps, delta, accountant: as in ``dp_epsilon`` (``steps`` >= 1).

    Returns:
      ``sigma`` (a float): ``dp_epsilon(sigma, ...) <= target_epsilon``, and ``sigma`` is within
      1e-4 (relative) of the smallest such value (at least 0.1, where the search stops).

    Raises:
      ValueError: when no noise multiplier up to 1000 reaches ``target_epsilon``.

    >>> sigma = dp_noise_multiplier(3.0, 256 / 60000, 14062, 1e-5)
    >>> round(sigma, 2), dp_epsilon(sigma, 256 / 60000, 14062, 1e-5) <= 3.0
    (1.01, True)
    """
    sampling_rate, steps, delta = _check(sampling_rate, steps, delta, accountant)
    target_epsilon = _real(target_epsilon, "target_epsilon")
    if not 0 < target_epsilon < math.inf:
        raise ValueError(f"target_epsilon: expected a finite number > 0, got {target_epsilon!r}")
    if steps < 1:
        raise ValueError(f"steps: expected an int >= 1, got {steps!r}")

    def epsilon(sigma: float) -> float:
        return dp_epsilon(sigma, sampling_rate, steps, delta, accountant=accountant)

    if epsilon(_MAX_NOISE_MULTIPLIER) > target_epsilon:
        raise ValueError(
            f"target_epsilon: {target_epsilon!r} is not reached by any noise multiplier up to "
            f"{_MAX_NOISE_MULTIPLIER:g} in {steps} steps at sampling_rate={sampling_rate!r} and "
            f"delta={delta!r}; allow a larger epsilon or delta, or fewer steps"
        )
    low, high = 0.5, 1.0
    while epsilon(high) > target_epsilon:
        low, high = high, 2 * high
    while low > _MIN_NOISE_MULTIPLIER and epsilon(low) <= target_epsilon:
        low, high = max(low / 2, _MIN_NOISE_MULTIPLIER), low
    if epsilon(low) <= target_epsilon:
        return low
    # bisection on [low, high], epsilon(low) > target >= epsilon(high): the smallest sigma lies
    # in (low, high], so high is within 1e-4 of it once the bracket is that narrow (a PLD
    # accountant's grid depends on sigma, which dp-accounting's calibration cannot vary)
    while high - low > 1e-4 * low:
        middle = (low + high) / 2
        if epsilon(middle) <= target_epsilon:
            high = middle
        else:
            low = middle
    return high
