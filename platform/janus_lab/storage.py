"""Local paths and `s3://` URIs behind one small interface.

S3 clients (s3fs, pyarrow, boto3) all read the standard AWS variables (`AWS_ENDPOINT_URL`,
keys, region), so pointing the project at another object store is configuration, not code.
"""

from __future__ import annotations

import fcntl
import json
import os
import shutil
import tempfile
from pathlib import Path

S3_SCHEME = "s3://"


def is_s3_uri(uri: str | os.PathLike) -> bool:
    """True for `s3://bucket/key` URIs."""
    return str(uri).startswith(S3_SCHEME)


def strip_scheme(uri: str) -> str:
    """`s3://bucket/key` -> `bucket/key` (the form pyarrow and Ray's storage_path want)."""
    return uri[len(S3_SCHEME):] if is_s3_uri(uri) else uri


def s3_filesystem():
    """An s3fs filesystem configured from the environment."""
    import s3fs

    endpoint = os.environ.get("AWS_ENDPOINT_URL")
    client_kwargs = {"endpoint_url": endpoint} if endpoint else {}
    region = os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION")
    if region:
        client_kwargs["region_name"] = region
    # Listings must not be served from a stale cache: shards and checkpoints appear while we run.
    return s3fs.S3FileSystem(client_kwargs=client_kwargs, use_listings_cache=False)


def pyarrow_filesystem(uri: str, retry_attempts: int | None = None):
    """A pyarrow filesystem and the path inside it for a local path or an `s3://` URI.

    Args:
        retry_attempts: tries of pyarrow's own S3 retry strategy (default: its 3);
            `janus_lab.retry.sdk_retry_attempts` turns a retry budget into a count.
    """
    from pyarrow import fs as pafs

    if not is_s3_uri(uri):
        return pafs.LocalFileSystem(), str(Path(uri).absolute())
    endpoint = os.environ.get("AWS_ENDPOINT_URL")
    kwargs = {"region": os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION") or "us-east-1"}
    if endpoint:
        scheme, _, host = endpoint.partition("://")
        kwargs.update(endpoint_override=host, scheme=scheme)
    if retry_attempts:
        return _retrying_s3_filesystem(retry_attempts, kwargs), strip_scheme(uri)
    return pafs.S3FileSystem(**kwargs), strip_scheme(uri)


def _retrying_s3_filesystem(attempts: int, kwargs: dict):
    """A pyarrow S3 filesystem with `attempts` tries per call, that keeps them when pickled.

    pyarrow's own pickling of `S3FileSystem` drops `retry_strategy` (measured: a pickled copy
    failed a write to a dead endpoint in 1 s instead of 6 s), and Ray hands the filesystem to
    its Train controller and workers pickled.
    """
    from pyarrow import fs as pafs

    class RetryingS3FileSystem(pafs.S3FileSystem):
        def __reduce__(self):
            return _retrying_s3_filesystem, (attempts, kwargs)

    return RetryingS3FileSystem(retry_strategy=pafs.AwsDefaultS3RetryStrategy(max_attempts=attempts), **kwargs)


def default_cache_dir() -> Path:
    """Where downloaded checkpoints live (`JANUS_CACHE_DIR`, else ~/.cache/janus-lab)."""
    return Path(os.environ.get("JANUS_CACHE_DIR", Path.home() / ".cache" / "janus-lab"))


def download_prefix(uri: str, cache_dir: str | os.PathLike | None = None, retry=None) -> Path:
    """Copies every object under an `s3://` prefix into a local cache folder.

    The cache is reused while the remote listing (keys, sizes, ETags) is unchanged; a download
    goes to a temporary folder first and is moved into place whole, so an interrupted download
    is never mistaken for a complete one. Processes that share the cache (the encoder actors or
    replicas of one node) take a file lock: one downloads, the others wait and reuse its copy,
    and a folder another process may be reading is never swapped under it for the same listing.
    The listing and each file are retried through an S3 outage (`retry`, an `S3RetryConfig`;
    `janus_lab.retry`): a replica loading a new champion waits for S3 instead of failing.

    Returns:
        The local folder mirroring the prefix.

    Raises:
        FileNotFoundError: nothing exists under the prefix.
        janus_lab.retry.S3UnavailableError: S3 did not answer within the retry budget.
    """
    from janus_lab.retry import with_s3_retries

    fs = s3_filesystem()
    prefix = strip_scheme(uri).rstrip("/")
    listing = {}
    found = with_s3_retries(lambda: fs.find(prefix, detail=True), "listing", uri, retry)
    for key, info in sorted(found.items()):
        listing[key[len(prefix):].lstrip("/")] = [info.get("size"), str(info.get("ETag", ""))]
    if not listing:
        raise FileNotFoundError(f"no objects under {uri}")
    target = Path(cache_dir or default_cache_dir()) / "s3" / prefix
    marker = target / ".janus-download.json"

    def cached() -> bool:
        return marker.exists() and json.loads(marker.read_text()) == listing

    if cached():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with open(target.parent / f".{target.name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # released when the file closes, or the process dies
        if cached():  # another process finished it while this one waited
            return target
        staging = Path(tempfile.mkdtemp(prefix=f".{target.name}-", dir=target.parent))
        try:
            for relative in listing:
                local = staging / relative
                local.parent.mkdir(parents=True, exist_ok=True)
                source = f"{prefix}/{relative}"
                with_s3_retries(lambda: fs.get_file(source, str(local)), "downloading", f"s3://{source}", retry)
            (staging / marker.name).write_text(json.dumps(listing))
            if target.exists():
                shutil.rmtree(target)
            staging.rename(target)
        finally:
            if staging.exists():
                shutil.rmtree(staging, ignore_errors=True)
    return target


def upload_folder(local: str | os.PathLike, uri: str) -> None:
    """Copies a local folder to an `s3://` prefix (files keep their relative paths)."""
    fs = s3_filesystem()
    prefix = strip_scheme(uri).rstrip("/")
    root = Path(local)
    for path in sorted(root.rglob("*")):
        if path.is_file():
            fs.put_file(str(path), f"{prefix}/{path.relative_to(root).as_posix()}")
