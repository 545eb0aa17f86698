"""The one thin adapter between janus-lab and MLflow.

The driver opens the run (so a restarted worker group keeps logging into the same run), and
inside training only rank 0 logs. Every call is a no-op on other ranks.
"""

from __future__ import annotations

import contextlib
import os
import subprocess
import tempfile
from pathlib import Path
from typing import Any, Callable, Mapping

GIT_COMMIT_TAG = "git_commit"
PARENT_RUN_TAG = "mlflow.parentRunId"
"""MLflow's own tag for nesting: a sweep trial's run is a child of the sweep's run."""


def git_commit(repo: str | os.PathLike | None = None) -> str:
    """The current commit of the repository the code runs from, or "unknown"."""
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=repo or Path(__file__).resolve().parent,
                             capture_output=True, text=True, timeout=10)
        return out.stdout.strip() or "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def resolve_tracking_uri(configured: str | None) -> str:
    """The configured tracking URI, else MLFLOW_TRACKING_URI, else a local SQLite file."""
    return configured or os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{Path('mlflow.db').absolute()}"


class TrackingServerError(ConnectionError):
    """The MLflow tracking server does not answer."""


def check_tracking_server(uri: str, error: Callable[[str], Exception] = TrackingServerError,
                          timeout_s: float = 5.0, attempts: int = 3) -> None:
    """Fails fast, naming the URI, when an HTTP tracking server does not answer.

    MLflow's own client retries a refused connection for about four minutes before it raises;
    a job should say within seconds that the server is down. Any HTTP answer from
    `<uri>/health` counts as up (an authenticating proxy may answer 401); only a refused,
    unresolvable or silent address fails. Other URIs (a SQLite file, `databricks`) pass.

    Args:
        uri: the tracking URI.
        error: makes the exception raised from the message (a job's own error type).

    Raises:
        `error(message)` (TrackingServerError by default): no answer after `attempts` tries,
        one second apart.
    """
    import time
    import urllib.error
    import urllib.request

    if not uri.startswith(("http://", "https://")):
        return
    reason = "no answer"
    for attempt in range(attempts):
        try:
            with urllib.request.urlopen(f"{uri.rstrip('/')}/health", timeout=timeout_s):
                return
        except urllib.error.HTTPError:
            return  # it answered
        except (urllib.error.URLError, OSError) as err:
            reason = str(getattr(err, "reason", err))
        if attempt + 1 < attempts:
            time.sleep(1.0)
    raise error(
        f"the MLflow tracking server {uri} is not reachable ({reason}); start the local stack "
        "(`make up`, then `source run/stack/env.sh`) or point tracking_uri / MLFLOW_TRACKING_URI "
        "at a running server")


def ensure_experiment(client, name: str) -> str:
    """The id of an experiment, created if needed.

    Uses the client rather than `mlflow.set_experiment`, which exports MLFLOW_EXPERIMENT_ID
    and silently redirects other runs in the process.
    """
    experiment = client.get_experiment_by_name(name)
    return experiment.experiment_id if experiment else client.create_experiment(name)


TRACKING_WAIT_S = 600.0
"""How long a call waits for an MLflow server that does not answer (a sweep trial starting, the
sweep's summary), and how long a buffered logger's flush waits at the end of training."""


def is_unanswered(error: BaseException) -> bool:
    """Whether an MLflow client error means the server did not answer (refused, reset, timed
    out, a proxy's 502-504), as opposed to an answer refusing the request."""
    import requests

    if isinstance(error, (ConnectionError, TimeoutError, requests.exceptions.ConnectionError,
                          requests.exceptions.Timeout)):
        return True
    text = str(error)
    return ("Max retries exceeded" in text or "Connection refused" in text or "Connection aborted" in text
            or any(f"status code {code}" in text or f"error code {code}" in text for code in (502, 503, 504)))


def call_tracking(tracking_uri: str, what: str, call: Callable[[], Any], wait_s: float = TRACKING_WAIT_S,
                  max_delay_s: float = 10.0) -> Any:
    """`call()`, tried again with backoff while the MLflow server does not answer, with a line per
    try saying what waits: `MLflow unavailable at http://…: opening run … : retry 3 in 4 s (…)`.

    MLflow's own client would retry a refused connection for about four minutes inside the call,
    saying nothing (check_tracking_server); here its retries are off for the call and the wait is
    ours, visible, and as long as a buffered logger's. A refusal that is an answer (a bad
    request, a missing run) is raised at once.

    Raises:
        TrackingUnavailableError: the server still did not answer after `wait_s`.
    """
    import logging
    import time

    log = logging.getLogger(__name__)
    give_up, delay, tries = time.monotonic() + wait_s, 1.0, 0
    while True:
        tries += 1
        try:
            with _client_retries_off():
                return call()
        except Exception as error:  # noqa: BLE001 - only an unanswered call is tried again
            if not is_unanswered(error):
                raise
            reason = str(error).splitlines()[0][:200] if str(error) else type(error).__name__
            if time.monotonic() + delay > give_up:
                raise TrackingUnavailableError(
                    f"the MLflow server {tracking_uri} did not answer {what} for {wait_s:.0f} s ({tries} tries; "
                    f"last error: {reason}); check the server (MLFLOW_TRACKING_URI)") from error
            log.warning("MLflow unavailable at %s: %s: retry %d in %.0f s (%s)", tracking_uri, what, tries, delay,
                        reason)
            time.sleep(delay)
            delay = min(delay * 2, max_delay_s)


@contextlib.contextmanager
def _client_retries_off():
    """A context in which MLflow's client makes one try per request (it reads the variable per call)."""
    saved = os.environ.get("MLFLOW_HTTP_REQUEST_MAX_RETRIES")
    os.environ["MLFLOW_HTTP_REQUEST_MAX_RETRIES"] = "0"
    try:
        yield
    finally:
        if saved is None:
            os.environ.pop("MLFLOW_HTTP_REQUEST_MAX_RETRIES", None)
        else:
            os.environ["MLFLOW_HTTP_REQUEST_MAX_RETRIES"] = saved


def find_run(tracking_uri: str, experiment: str, tags: Mapping[str, str]):
    """The newest run of an experiment carrying all the given tag values, or None.

    How a resumed sweep finds its parent run and each trial its own child run; waits out a
    server that does not answer (`call_tracking`).
    """
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri)
    query = " and ".join(f"tags.`{key}` = '{value}'" for key, value in tags.items())

    def search():
        found = client.get_experiment_by_name(experiment)
        if found is None:
            return None
        runs = client.search_runs([found.experiment_id], filter_string=query,
                                  order_by=["attributes.start_time DESC"], max_results=1)
        return runs[0] if runs else None

    return call_tracking(tracking_uri, f"looking up the run with {dict(tags)} in {experiment!r}", search)


class RunLogger:
    """Logs to one MLflow run by id; inactive (every call a no-op) unless `active`.

    Every call waits out a server that does not answer, saying so (`call_tracking`): a sweep's
    driver and its trials open runs and log summaries while training goes on elsewhere.

    Args:
        tracking_uri: the MLflow server.
        run_id: the run to log into (opened by the driver).
        active: true on the process that logs (rank 0).
    """

    def __init__(self, tracking_uri: str, run_id: str, active: bool = True):
        self.tracking_uri, self.run_id, self.active = tracking_uri, run_id, active
        self._client = None
        if active:
            from mlflow import MlflowClient

            self._client = MlflowClient(tracking_uri)

    def _call(self, what: str, method: str, *args, **kwargs) -> Any:
        """`self._client.<method>(*args, **kwargs)`, waiting out an unanswering server."""
        return call_tracking(self.tracking_uri, f"{what} of run {self.run_id}",
                             lambda: getattr(self._client, method)(*args, **kwargs))

    @classmethod
    def open_run(cls, tracking_uri: str, experiment: str, run_name: str, params: Mapping[str, Any],
                 tags: Mapping[str, str], parent_run_id: str | None = None) -> "RunLogger":
        """Creates a run with its params and tags (driver side), a child of `parent_run_id` if given."""
        from mlflow import MlflowClient

        client = MlflowClient(tracking_uri)
        tags = dict(tags) | ({PARENT_RUN_TAG: parent_run_id} if parent_run_id else {})
        run = call_tracking(tracking_uri, f"opening run {run_name!r} in {experiment!r}", lambda: client.create_run(
            ensure_experiment(client, experiment), run_name=run_name, tags=tags))
        logger = cls(tracking_uri, run.info.run_id)
        logger.log_params(params)
        return logger

    @classmethod
    def reopen(cls, tracking_uri: str, run_id: str) -> "RunLogger":
        """Logs into an existing run again (a sweep trial restarted by `--resume`), marked running."""
        logger = cls(tracking_uri, run_id)
        logger._call("marking running", "update_run", run_id, status="RUNNING")
        return logger

    def log_params(self, params: Mapping[str, Any]) -> None:
        if not self.active:
            return
        from mlflow.entities import Param

        items = [Param(k, str(v)[:6000]) for k, v in params.items()]
        for start in range(0, len(items), 100):
            self._call("logging params", "log_batch", self.run_id, params=items[start:start + 100])

    def log_new_params(self, params: Mapping[str, Any]) -> dict[str, tuple[str, str]]:
        """Logs the params the run does not have yet; MLflow keeps a param's first value.

        Returns:
            {key: (logged value, new value)} for params whose value changed (a resumed run
            extended with a higher `train.max_steps`, say); the caller records them.
        """
        if not self.active:
            return {}
        logged = self._call("reading params", "get_run", self.run_id).data.params
        new = {k: v for k, v in params.items() if k not in logged}
        self.log_params(new)
        return {k: (logged[k], str(v)[:6000]) for k, v in params.items()
                if k in logged and logged[k] != str(v)[:6000]}

    def log_metrics(self, metrics: Mapping[str, float], step: int) -> None:
        if not self.active:
            return
        import time

        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        self._call(f"logging metrics of step {step}", "log_batch", self.run_id,
                   metrics=[Metric(k, float(v), now, step) for k, v in metrics.items()])

    def set_tags(self, tags: Mapping[str, str]) -> None:
        if not self.active:
            return
        for key, value in tags.items():
            self._call(f"setting tag {key}", "set_tag", self.run_id, key, str(value))

    def log_artifact(self, path: str | os.PathLike, artifact_path: str | None = None) -> None:
        if self.active:
            self._call(f"uploading {Path(path).name}", "log_artifact", self.run_id, str(path), artifact_path)

    def log_text(self, text: str, artifact_file: str) -> None:
        if self.active:
            self._call(f"writing {artifact_file}", "log_text", self.run_id, text, artifact_file)

    def log_image(self, image, artifact_file: str) -> None:
        """Logs a PIL image as a PNG artifact."""
        if not self.active:
            return
        with tempfile.TemporaryDirectory() as tmp:
            path = Path(tmp) / Path(artifact_file).name
            image.save(path)
            parent = str(Path(artifact_file).parent)
            self._call(f"uploading {artifact_file}", "log_artifact", self.run_id, str(path),
                       None if parent == "." else parent)

    def end(self, status: str = "FINISHED") -> None:
        if self.active:
            self._call(f"ending ({status})", "set_terminated", self.run_id, status)

    def run_url(self) -> str:
        """A link to the run in the MLflow UI (or the run id for a file store)."""
        if self.tracking_uri.startswith("http"):
            from mlflow import MlflowClient

            experiment_id = call_tracking(self.tracking_uri, f"reading run {self.run_id}", lambda: MlflowClient(
                self.tracking_uri).get_run(self.run_id).info.experiment_id)
            return f"{self.tracking_uri.rstrip('/')}/#/experiments/{experiment_id}/runs/{self.run_id}"
        return f"{self.tracking_uri} run {self.run_id}"


class TrackingUnavailableError(ConnectionError):
    """The MLflow server stayed away longer than a buffered logger could wait at the end."""


class BufferedRunLogger(RunLogger):
    """A `RunLogger` whose metrics, sample images and tags go to MLflow from a background thread,
    so training never waits for the tracking server (docs/reliability.md).

    While the server does not answer, what was logged stays queued, in order, and the thread
    retries the oldest item with backoff, saying once per outage what it holds. Each metric
    keeps the timestamp of its `log_metrics` call, so sending a batch again after a lost answer
    writes rows MLflow already has (its SQL store skips exact duplicates), not new steps.
    `flush` (called before the training function returns) waits for the queue to drain and
    raises `TrackingUnavailableError`, naming the server and what is unsent, past its deadline.

    Args:
        retry_delay_s: longest wait between tries while the server is away.
    """

    def __init__(self, tracking_uri: str, run_id: str, active: bool = True, retry_delay_s: float = 5.0):
        if active:
            # MLflow's client retries a refused connection for about four minutes inside one call
            # (check_tracking_server); this thread retries by itself, and a call stuck that long
            # would hold queued steps back well after the server returned. Only this process's
            # MLflow calls are affected: the logging rank's, which all go through here.
            os.environ["MLFLOW_HTTP_REQUEST_MAX_RETRIES"] = "0"
            os.environ["MLFLOW_HTTP_REQUEST_TIMEOUT"] = "30"
        super().__init__(tracking_uri, run_id, active)
        import collections
        import threading

        self.retry_delay_s = retry_delay_s
        self._queue: collections.deque = collections.deque()
        self._wake = threading.Condition()
        self._files = tempfile.TemporaryDirectory(prefix="janus-mlflow-") if active else None
        self._images_logged = 0  # names each image's staging folder: a queue length or id() repeats
        self._thread = threading.Thread(target=self._send_forever, name="mlflow-sender", daemon=True)
        self.outages = 0
        """How many times the server stopped answering while items were queued."""
        if active:
            self._thread.start()

    def log_metrics(self, metrics: Mapping[str, float], step: int) -> None:
        if not self.active:
            return
        import time

        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        self._put(("metrics", [Metric(k, float(v), now, step) for k, v in metrics.items()]))

    def set_tags(self, tags: Mapping[str, str]) -> None:
        if self.active:
            self._put(("tags", {k: str(v) for k, v in tags.items()}))

    def log_image(self, image, artifact_file: str) -> None:
        if not self.active:
            return
        self._images_logged += 1
        folder = Path(self._files.name) / f"{self._images_logged:06d}"
        folder.mkdir()
        path = folder / Path(artifact_file).name
        image.save(path)
        parent = str(Path(artifact_file).parent)
        self._put(("artifact", (str(path), None if parent == "." else parent)))

    def pending(self) -> int:
        """Items (metric batches, images, tag sets) not yet accepted by the server."""
        with self._wake:
            return len(self._queue)

    def flush(self, timeout_s: float = TRACKING_WAIT_S) -> None:
        """Waits until the server has everything logged so far.

        Raises:
            TrackingUnavailableError: items are still unsent after `timeout_s`.
        """
        if not self.active:
            return
        import time

        deadline = time.monotonic() + timeout_s
        with self._wake:
            while self._queue and time.monotonic() < deadline:
                self._wake.wait(min(1.0, max(0.0, deadline - time.monotonic())))
            left = len(self._queue)
        if left:
            raise TrackingUnavailableError(
                f"the MLflow server {self.tracking_uri} did not take {left} queued items (metrics of some steps, "
                f"images or tags) of run {self.run_id} within {timeout_s:.0f} s: they are missing from the run's "
                "history. Training, its checkpoints and the export are complete; check the server (MLFLOW_TRACKING_URI)")

    def _put(self, item) -> None:
        with self._wake:
            self._queue.append(item)
            self._wake.notify_all()

    def _send(self, item) -> None:
        kind, payload = item
        if kind == "metrics":
            self._client.log_batch(self.run_id, metrics=payload)
        elif kind == "tags":
            for key, value in payload.items():
                self._client.set_tag(self.run_id, key, value)
        else:
            path, parent = payload
            self._client.log_artifact(self.run_id, path, parent)

    def _send_forever(self) -> None:
        import logging
        import time

        log = logging.getLogger(__name__)
        delay, failing = 0.5, False
        while True:
            with self._wake:
                while not self._queue:
                    self._wake.wait()
                item = self._queue[0]
            try:
                self._send(item)
            except Exception as error:  # noqa: BLE001 - any failure to send keeps the item queued
                if not failing:
                    self.outages += 1
                    log.warning("MLflow unavailable at %s: %d items queued for run %s, sending again every "
                                "%.0f s at most (%s)", self.tracking_uri, self.pending(), self.run_id,
                                self.retry_delay_s, str(error).splitlines()[0][:200] if str(error) else type(error).__name__)
                failing = True
                time.sleep(delay)
                delay = min(delay * 2, self.retry_delay_s)
                continue
            if failing:
                log.warning("MLflow back at %s: sending the %d queued items of run %s", self.tracking_uri,
                            self.pending(), self.run_id)
            failing, delay = False, 0.5
            with self._wake:
                self._queue.popleft()
                self._wake.notify_all()
