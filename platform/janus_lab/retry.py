"""Retrying storage calls through a short S3 outage, and saying so.

A multi-hour job meets an object store that stops answering for a minute (a restart, a
failover, throttling). The clients' own retries (pyarrow: 3 tries, botocore: a few) give up
within seconds, so a job would fail on a blip. `with_s3_retries` retries a whole idempotent
step (write a shard, read a window of row groups, upload a checkpoint) with exponential
backoff, logs a line per retry naming what is retried, and when the budget is spent raises
`S3UnavailableError` naming S3, the URI and the config key that sets the budget.

Only errors that mean "the service did not answer" are retried: a missing key, a denied
request or a full disk fail at once, since waiting would not change them.
"""

from __future__ import annotations

import dataclasses
import errno
import logging
import re
import time
from collections.abc import Callable
from typing import TypeVar

from janus_lab.config import check_non_negative, check_positive

log = logging.getLogger(__name__)

T = TypeVar("T")

# What pyarrow (AWS SDK), botocore, s3fs and urllib3 say when the endpoint is down or not ready
# yet (measured against a stopped and a restarting SeaweedFS; docs/platform-notes.md, "SeaweedFS").
_UNAVAILABLE_MARKERS = (
    "NETWORK_CONNECTION", "couldn't connect", "could not connect", "connection refused",
    "connection reset", "connection aborted", "remotedisconnected", "failed to connect",
    "endpointconnectionerror", "connect timeout", "read timeout", "timed out",
    "serviceunavailable", "service unavailable", "slowdown", "internalerror", "internal_failure",
    "we encountered an internal error",
)
# An HTTP 502/503/504 status in a message, not digits inside a key or path ("part-503.parquet").
_GATEWAY_STATUS = re.compile(r"(?<![\w/.-])50[234](?![\w/.-])")


class S3UnavailableError(ConnectionError):
    """S3 did not answer within the retry budget."""


def is_unavailable(error: BaseException) -> bool:
    """True when `error` means the S3 endpoint did not answer (worth retrying), not that the
    request itself was wrong (a missing key, a denied request, a full disk)."""
    if isinstance(error, (FileNotFoundError, FileExistsError, PermissionError, IsADirectoryError,
                          NotADirectoryError)):
        return False
    if isinstance(error, OSError) and error.errno == errno.ENOSPC:
        return False
    if isinstance(error, (ConnectionError, TimeoutError)):
        return True
    try:
        from botocore.exceptions import ConnectionError as BotoConnectionError
        from botocore.exceptions import HTTPClientError

        if isinstance(error, (BotoConnectionError, HTTPClientError)):
            return True
    except ImportError:
        pass
    text = f"{type(error).__name__}: {error}".lower()
    return any(marker.lower() in text for marker in _UNAVAILABLE_MARKERS) or bool(_GATEWAY_STATUS.search(text))


@dataclasses.dataclass
class S3RetryConfig:
    """How long a job waits out an S3 outage before it fails (the `retry` section; docs/reliability.md)."""

    attempts: int = 8
    """Tries of one storage step (a shard write, a window read, a checkpoint upload) while S3 does
    not answer; 1 = no retry. The defaults wait 1+2+4+8+16+30+30 s, about 1.5 min, in all."""
    first_delay_s: float = 1.0
    """Wait before the first retry; each later wait doubles."""
    max_delay_s: float = 30.0
    """Longest single wait."""

    def __post_init__(self) -> None:
        check_positive(self, "attempts")
        check_non_negative(self, "first_delay_s", "max_delay_s")


def backoff_delays(policy: S3RetryConfig) -> list[float]:
    """The waits between tries: `first_delay_s`, doubling, capped at `max_delay_s`."""
    return [min(policy.first_delay_s * 2**i, policy.max_delay_s) for i in range(policy.attempts - 1)]


def sdk_retry_attempts(policy: S3RetryConfig | None = None) -> int:
    """Tries for pyarrow's own S3 retry strategy (the AWS SDK's: 25 ms, doubling) that wait at
    least as long in all as `policy`: for storage calls made by code we do not wrap (Ray Train's
    controller writing its state and the checkpoints it copies)."""
    budget = sum(backoff_delays(policy or S3RetryConfig()))
    attempts = 1
    while 0.025 * (2 ** (attempts - 1) - 1) < budget:
        attempts += 1
    return attempts


def with_s3_retries(call: Callable[[], T], what: str, uri: str, policy: S3RetryConfig | None = None,
                    setting: str = "retry", on_retry: Callable[[], None] | None = None) -> T:
    """Calls `call()` until it succeeds, retrying while S3 is unavailable.

    `call` must be safe to run again after a failure: it rewrites a whole object (an S3 object
    appears only when its upload completes, so a failed try leaves nothing visible), or it only
    reads.

    Args:
        what: the step, for the log line and the error ("writing shard").
        uri: the object or prefix it touches.
        policy: the retry budget (default: `S3RetryConfig()`).
        setting: the config section that holds the budget, quoted in the error ("retry", "args.retry").
        on_retry: called before each retry (a counter; cleanup of a partial local copy).

    Raises:
        S3UnavailableError: every try failed because S3 did not answer.
        Exception: the first error that is not an outage, unchanged.
    """
    policy = policy or S3RetryConfig()
    delays = backoff_delays(policy)
    started = time.monotonic()
    for attempt in range(policy.attempts):
        try:
            return call()
        except Exception as error:  # noqa: BLE001 - classified below; the rest re-raised as is
            if not is_unavailable(error):
                raise
            if attempt == len(delays):
                raise S3UnavailableError(
                    f"S3 unavailable {what} {uri}: gave up after {policy.attempts} tries over "
                    f"{time.monotonic() - started:.0f} s (last error: {_one_line(error)}). Check that the S3 "
                    f"endpoint ({_endpoint()}) is up, then rerun; a longer outage needs a larger "
                    f"{setting}.attempts or {setting}.max_delay_s") from error
            delay = delays[attempt]
            log.warning("S3 unavailable %s %s: retry %d/%d in %.0f s (%s)", what, uri, attempt + 1,
                        policy.attempts - 1, delay, _one_line(error))
            if on_retry is not None:
                on_retry()
            time.sleep(delay)
    raise AssertionError("unreachable")  # the loop returns or raises


def _one_line(error: BaseException) -> str:
    lines = str(error).strip().splitlines()
    return f"{type(error).__name__}: {lines[0][:200] if lines else ''}"


def _endpoint() -> str:
    import os

    return os.environ.get("AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL unset: the AWS default")
