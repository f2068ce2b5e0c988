"""The autoscaler's decisions (services/inference/autoscaler.py): out above the target over the
scale-up window, in when the peak over the scale-down window fits fewer, to zero when idle."""

from __future__ import annotations

import pytest

from services.inference.autoscaler import Policy, Sample, decide

POLICY = Policy(target_in_flight=4, up_window=5, down_window=30, idle_to_zero=60)


class Row:
    """The fields decide() reads of a deployment."""

    def __init__(self, min_replicas: int = 1, max_replicas: int = 4, target_in_flight: int = 0) -> None:
        self.min_replicas, self.max_replicas, self.target_in_flight = min_replicas, max_replicas, target_in_flight


def steady(in_flight: float, seconds: int, requests: int = 10) -> list[Sample]:
    return [Sample(float(t), in_flight, requests) for t in range(seconds + 1)]


def test_scales_out_once_the_load_stayed_above_the_target_for_the_window():
    assert decide(Row(), 1, steady(10, 3), at=3, policy=POLICY) is None  # window not yet full
    to, reason = decide(Row(), 1, steady(10, 6), at=6, policy=POLICY)
    assert to == 3  # ceil(10 / 4)
    assert "10.0 requests in flight" in reason and "target of 4" in reason


def test_scale_out_stops_at_max_replicas_and_uses_the_deployments_own_target():
    to, _ = decide(Row(max_replicas=2), 1, steady(50, 6), at=6, policy=POLICY)
    assert to == 2
    to, _ = decide(Row(target_in_flight=1), 1, steady(3, 6), at=6, policy=POLICY)
    assert to == 3
    assert decide(Row(max_replicas=2), 2, steady(50, 6), at=6, policy=POLICY) is None


def test_a_short_spike_does_not_scale_out():
    samples = steady(1, 6)
    samples[3] = Sample(3.0, 12, 10)
    # The average over the window stays under the target of 4.
    assert decide(Row(), 1, samples, at=6, policy=POLICY) is None


def test_scales_in_only_when_the_peak_over_the_window_fits_fewer_and_never_below_min():
    assert decide(Row(), 3, steady(2, 20), at=20, policy=POLICY) is None  # window not yet full
    to, reason = decide(Row(), 3, steady(2, 31), at=31, policy=POLICY)
    assert to == 1 and "at most 2.0 requests in flight" in reason
    to, _ = decide(Row(min_replicas=2), 3, steady(0.5, 31), at=31, policy=POLICY)
    assert to == 2
    busy = steady(2, 31)
    busy[20] = Sample(20.0, 9, 10)  # one busy moment keeps three replicas
    assert decide(Row(), 3, busy, at=31, policy=POLICY) is None


@pytest.mark.parametrize(("min_replicas", "expected"), [(0, 0), (1, None)])
def test_only_a_min_zero_deployment_scales_to_zero_after_the_idle_window(min_replicas, expected):
    idle = steady(0, 61, requests=0)
    decision = decide(Row(min_replicas=min_replicas), 1, idle, at=61, policy=POLICY)
    assert (decision[0] if decision else None) == expected
    one_request = steady(0, 61, requests=0)
    one_request[50] = Sample(50.0, 0.01, 1)
    assert decide(Row(min_replicas=0), 1, one_request, at=61, policy=POLICY) is None


def test_a_deployment_at_zero_is_left_to_the_next_request():
    assert decide(Row(min_replicas=0), 0, steady(10, 10), at=10, policy=POLICY) is None
