"""Webhook signatures, retry timing and endpoint checks (issue 22), without a network."""

from __future__ import annotations

import random

import pytest

from server import webhook as wh

SECRET = "s3cret-of-sixteen-chars"


def test_signature_verifies_and_refuses_changes_and_old_timestamps():
    """HMAC-SHA256 of "t.body": the same body verifies; a changed body, another secret or
    a timestamp beyond the tolerance does not."""
    body = b'{"id":"bill_issued/acme/2027-01-19"}'
    header = wh.signature(SECRET, 1_800_000_000, body)
    assert header.startswith("t=1800000000,v1=") and len(header.split("v1=")[1]) == 64
    assert wh.verify(SECRET, header, body, 1_800_000_000 + 299)
    assert not wh.verify(SECRET, header, body + b" ", 1_800_000_000)
    assert not wh.verify("another-secret-0000", header, body, 1_800_000_000)
    assert not wh.verify(SECRET, header, body, 1_800_000_000 + 301)
    assert not wh.verify(SECRET, "garbage", body, 1_800_000_000)


def test_retry_delays_grow_exponentially_with_jitter_and_a_cap():
    """Full jitter: every wait is within [0, min(cap, first * 2^(n-1))]."""
    rng = random.Random(1)
    for attempts in range(1, 40):
        ceiling = min(wh.RETRY_DELAY_MAX_S, wh.RETRY_FIRST_S * 2 ** (attempts - 1))
        waits = [wh.retry_delay_s(attempts, rng) for _ in range(50)]
        assert all(0 <= w <= ceiling for w in waits) and max(waits) > ceiling / 4


@pytest.mark.parametrize("url, secret, insecure, problem", [
    ("https://hooks.example.com/ql", SECRET, False, None),
    ("http://127.0.0.1:8000/ql", SECRET, False, None),
    ("http://localhost/ql", SECRET, False, None),
    ("http://hooks.example.com/ql", SECRET, False, "needs https://"),
    ("http://hooks.example.com/ql", SECRET, True, None),
    ("hooks.example.com", SECRET, False, "is not an http(s) URL"),
    ("ftp://127.0.0.1/x", SECRET, False, "is not an http(s) URL"),
    ("https://hooks.example.com/ql", "", False, "secret is missing"),
])
def test_endpoint_checks(url, secret, insecure, problem):
    """A bad endpoint is named in one line; a loopback URL may be plain http."""
    found = wh.endpoint_problems(wh.Endpoint("ops", url, secret), insecure)
    if problem is None:
        assert found == []
    else:
        assert len(found) == 1 and problem in found[0] and "'ops'" in found[0]
