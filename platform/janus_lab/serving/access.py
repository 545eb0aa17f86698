"""Who may call the image server, and how much: API keys and per-key limits.

Keys come from an environment variable and/or a file named in `args.access` (on KubeRay, a
Secret), never from the config itself. A request must send `Authorization: Bearer <key>`;
the API deployment checks it before reading the body. Several keys may be active at once, and
the file is re-read when it changes, so a key is rotated by adding the new one, moving clients
over, then removing the old one, with no restart.

Only SHA-256 digests of the keys are kept, compared in constant time; a key is known to the
logs and the limiter by the first hex digits of its digest (`key_id`), never by itself.

Per-key limits (requests and images in any 60 s) are counted in one `ApiLimiter` replica that
every API replica asks, so they hold however many API replicas run.
"""

from __future__ import annotations

import collections
import hashlib
import hmac
import logging
import math
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ray import serve

from janus_lab.serving.settings import AccessConfig, ServeArgs

logger = logging.getLogger("ray.serve")

OPEN_KEY_ID = "open"
"""The identity every request has on a server without keys (the limits still apply to it)."""
MIN_KEY_LENGTH = 16
"""Shorter keys are refused at load: a guessable key is no key."""
WINDOW_S = 60.0
"""The limits count what a key did in the last minute."""


class KeySourceError(RuntimeError):
    """A configured key source that gives no usable keys; the replica refuses to start open."""


def key_digest(key: str) -> bytes:
    return hashlib.sha256(key.encode("utf-8")).digest()


def key_id(digest: bytes) -> str:
    """What logs and the limiter call a key: 12 hex digits of its digest."""
    return digest.hex()[:12]


def parse_keys(text: str, separator: str | None, source: str) -> list[bytes]:
    """Digests of the keys in `text` (split on `separator`, or lines with `#` comments).

    Raises:
        KeySourceError: a key shorter than MIN_KEY_LENGTH or with spaces inside (the key
            itself is not quoted in the message).
    """
    if separator is None:
        entries = [(f"line {n}", line.split("#", 1)[0]) for n, line in enumerate(text.splitlines(), 1)]
    else:
        entries = [(f"entry {n}", item) for n, item in enumerate(text.split(separator), 1)]
    digests = []
    for where, raw in entries:
        key = raw.strip()
        if not key:
            continue
        if len(key) < MIN_KEY_LENGTH or any(c.isspace() for c in key):
            raise KeySourceError(f"{source}, {where}: a key must be at least {MIN_KEY_LENGTH} characters "
                                 f"without spaces (e.g. `openssl rand -hex 24`)")
        digests.append(key_digest(key))
    return digests


@dataclass
class _FileState:
    stamp: tuple[int, int, int] | None
    digests: list[bytes]


class ApiKeys:
    """The keys an API replica accepts, from `access.api_keys_env` and `access.api_keys_file`.

    Args:
        access: the `access` section of the application's args.
        environ: where the variable is read (default `os.environ`).
        recheck_s: how often a request may look at the file's modification time.

    Raises:
        KeySourceError: a key source is configured but unset, unreadable or empty.
    """

    def __init__(self, access: AccessConfig, environ: dict[str, str] | None = None, recheck_s: float = 1.0):
        self.access = access
        self.recheck_s = recheck_s
        self._checked_at = time.monotonic()
        self._env_digests: list[bytes] = []
        if access.api_keys_env:
            value = (os.environ if environ is None else environ).get(access.api_keys_env, "")
            self._env_digests = parse_keys(value, ",", f"${access.api_keys_env}")
        self._file = _FileState(None, [])
        if access.api_keys_file:
            self._file = self._read_file()
        if not access.open and not self.count:
            sources = " and ".join(s for s in (access.api_keys_env and f"${access.api_keys_env}",
                                               access.api_keys_file) if s)
            raise KeySourceError(f"access names {sources} but no key was found there; refusing to serve "
                                 f"without keys (remove access.api_keys_* to run an open server)")

    @property
    def count(self) -> int:
        return len(self._env_digests) + len(self._file.digests)

    def describe(self) -> str:
        """One line for the replica's log at start; no key in it."""
        if self.access.open:
            return ("no API keys configured (access.api_keys_env / access.api_keys_file): the server is "
                    "OPEN to anyone who can reach its port; fine on 127.0.0.1, not on a network")
        ids = ", ".join(key_id(d) for d in self._env_digests + self._file.digests)
        return f"API keys required: {self.count} active (ids {ids})"

    def identify(self, authorization: str | None) -> str | None:
        """The id of the key an `Authorization` header carries; None if it is missing or unknown.

        An open server gives every request OPEN_KEY_ID.
        """
        if self.access.open:
            return OPEN_KEY_ID
        scheme, _, presented = (authorization or "").strip().partition(" ")
        if scheme.lower() != "bearer" or not presented.strip():
            return None
        self._refresh()
        digest = key_digest(presented.strip())
        found = None
        # Every stored digest is compared, so the time taken does not say which one matched.
        for known in self._env_digests + self._file.digests:
            if hmac.compare_digest(digest, known):
                found = known
        return key_id(found) if found is not None else None

    def _refresh(self) -> None:
        if not self.access.api_keys_file or time.monotonic() - self._checked_at < self.recheck_s:
            return
        self._checked_at = time.monotonic()
        try:
            stamp = _stamp(Path(self.access.api_keys_file))
        except OSError:
            stamp = None
        if stamp == self._file.stamp:
            return
        try:
            self._file = self._read_file()
        except (OSError, KeySourceError) as err:
            # Keep serving with the keys read last; a half-written file must not lock everyone out.
            logger.error("re-reading %s failed (%s); keeping the %d keys read before",
                         self.access.api_keys_file, err, len(self._file.digests))
            self._file = _FileState(stamp, self._file.digests)
            return
        logger.info("%s changed: %d keys active now", self.access.api_keys_file, self.count)

    def _read_file(self) -> _FileState:
        path = Path(self.access.api_keys_file)
        try:
            stamp = _stamp(path)
            text = path.read_text()
        except OSError as err:
            raise KeySourceError(f"access.api_keys_file {path}: {err.strerror or err}") from None
        return _FileState(stamp, parse_keys(text, None, str(path)))


def _stamp(path: Path) -> tuple[int, int, int]:
    # Follows symlinks: a Kubernetes Secret volume swaps a `..data` link when the Secret changes.
    info = path.stat()
    return info.st_ino, info.st_mtime_ns, info.st_size


# --------------------------------------------------------------------------- limits


@dataclass
class LimitDecision:
    """What the limiter says about one request."""

    allowed: bool
    limit: str | None = None
    """`requests` or `images`: the limit the request would pass."""
    retry_after_s: int = 0
    """Whole seconds until the request would fit."""


class SlidingWindowLimits:
    """Per-key counts of requests and images over the last `window_s` seconds.

    Every admitted request is remembered with its time and image count until it is older than
    the window, so "at most N in any minute" holds exactly (a token bucket would let up to 2N
    through across a window's edge).

    Args:
        requests_per_window: most requests per key in any window (0: no limit).
        images_per_window: most images per key in any window (0: no limit).
        window_s: the window's length.
        clock: seconds, monotonic (tests pass their own).
    """

    def __init__(self, requests_per_window: int, images_per_window: int, window_s: float = WINDOW_S,
                 clock=time.monotonic):
        self.requests_per_window = requests_per_window
        self.images_per_window = images_per_window
        self.window_s = window_s
        self.clock = clock
        self._admitted: dict[str, collections.deque[tuple[float, int]]] = {}
        self._images: dict[str, int] = {}

    def admit(self, key: str, images: int) -> LimitDecision:
        """Counts the request if it fits both limits; otherwise counts nothing."""
        now = self.clock()
        admitted = self._admitted.setdefault(key, collections.deque())
        while admitted and admitted[0][0] <= now - self.window_s:
            self._images[key] -= admitted.popleft()[1]
        used_images = self._images.get(key, 0)
        if self.requests_per_window and len(admitted) + 1 > self.requests_per_window:
            excess = len(admitted) + 1 - self.requests_per_window
            return LimitDecision(False, "requests", self._wait(admitted, now, excess, count_images=False))
        if self.images_per_window and used_images + images > self.images_per_window:
            excess = used_images + images - self.images_per_window
            return LimitDecision(False, "images", self._wait(admitted, now, excess, count_images=True))
        admitted.append((now, images))
        self._images[key] = used_images + images
        return LimitDecision(True)

    def _wait(self, admitted, now: float, excess: int, *, count_images: bool) -> int:
        """Whole seconds until enough of the oldest entries leave the window to free `excess`
        requests (or images)."""
        freed = 0
        for at, images in admitted:
            freed += images if count_images else 1
            if freed >= excess:
                return max(1, math.ceil(at + self.window_s - now))
        return max(1, math.ceil(self.window_s))


@serve.deployment(name="ApiLimiter", num_replicas=1, max_ongoing_requests=1000, ray_actor_options={"num_cpus": 0})
class ApiLimiter:
    """The one place per-key counts live, shared by every API replica.

    Keep it at one replica: each replica would count on its own. If it restarts, the counts
    start again from zero (at worst one extra minute's worth per key).

    Args:
        args: the application's `args` (its `access` limits).
    """

    def __init__(self, args: dict[str, Any]):
        access = ServeArgs.parse(args).access
        self.limits = SlidingWindowLimits(access.requests_per_minute, access.images_per_minute)

    async def admit(self, key: str, images: int) -> dict[str, Any]:
        decision = self.limits.admit(key, images)
        return {"allowed": decision.allowed, "limit": decision.limit, "retry_after_s": decision.retry_after_s}
