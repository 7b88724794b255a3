"""The clients' resend policy and call deadlines (channel.py)."""

from __future__ import annotations

import time

import pytest

from render_client.channel import RETRY_POLICY, deadline_for, remaining, resend_delay, target_for
from render_wire.errors import CallCancelledError, InvalidArgumentError, RenderError, UnavailableError


@pytest.mark.parametrize("error", [UnavailableError("Stream removed"), CallCancelledError("CANCELLED")])
def test_broken_or_dropped_calls_are_resent_with_growing_delays_until_the_attempts_run_out(error: RenderError) -> None:
    delays = [resend_delay(error, attempt) for attempt in range(6)]
    assert delays[: RETRY_POLICY["maxAttempts"] - 1] == [0.1, 0.2, 0.4, 0.8]
    assert delays[RETRY_POLICY["maxAttempts"] - 1 :] == [None, None]


@pytest.mark.parametrize("error", [InvalidArgumentError("messages: empty"), RenderError("internal"), ValueError()])
def test_answers_from_the_server_are_never_resent(error: Exception) -> None:
    assert resend_delay(error, 0) is None


def test_no_resend_outlives_the_call_deadline() -> None:
    assert resend_delay(UnavailableError("x"), 0, deadline_for(0.05)) is None
    assert resend_delay(UnavailableError("x"), 0, deadline_for(5.0)) == 0.1


def test_remaining_counts_down_to_zero_and_none_means_no_deadline() -> None:
    deadline = deadline_for(0.01)
    assert 0 < remaining(deadline) <= 0.01
    time.sleep(0.02)
    assert remaining(deadline) == 0.0
    assert deadline_for(None) is None and remaining(None) is None


def test_address_lists_become_one_round_robin_target() -> None:
    assert target_for("render:50051") == "render:50051"
    assert target_for(["10.0.0.1:1", "10.0.0.2:1"]) == "ipv4:10.0.0.1:1,10.0.0.2:1"
