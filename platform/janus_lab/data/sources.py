"""Raw datasets: their records, where their images are, and reading those images.

Three layouts, each a folder (local or `s3://`):

- `sharegpt4o` (ShareGPT-4o-Image): `text_to_image.json` and/or `text_and_image_to_image.json`,
  JSON arrays of `{input_prompt, output_image, input_image: [..]}`; images `image/*.png`
  shipped inside `*_part_N.tar`.
- `echo4o` (Echo-4o-Image): `*.jsonl` files of `{instruction, output_image, type, task_type}`
  (plus `input_images` for multi-reference records), images inside `.tar.gz` parts.
- `jsonl`: `*.jsonl` files of `{id?, task?, prompt, output_image, input_images?}`.

An image path in a record is relative to the folder of the file that holds the record. It is
looked up as a plain file under the source folder first, then as a member of any archive
(`.tar`, `.tar.gz`, `.tgz`) below it, by the member's path relative to the archive's folder or
to any folder between it and the source folder. Archives are never unpacked to disk: a `.tar`
member is read in place (one ranged read), a compressed archive is streamed once.

A source that is unusable as a whole raises `SourceError` at once; a bad record becomes a
`Reject` with a reason and never stops the others (`check_records`).
"""

from __future__ import annotations

import json
import os
import posixpath
import tarfile
from collections import defaultdict
from dataclasses import dataclass, field
from typing import Iterable, Iterator

from pyarrow import fs as pafs

from janus_lab.data.schema import (
    DUPLICATE_ID,
    EMPTY_PROMPT,
    MALFORMED_RECORD,
    MISSING_IMAGE,
    NO_INPUT_IMAGE,
    PATH_ESCAPE,
    Reject,
)
from janus_lab.storage import pyarrow_filesystem

FORMATS = ("sharegpt4o", "echo4o", "jsonl")
SHAREGPT_FILES = {"text_to_image.json": "t2i", "text_and_image_to_image.json": "ti2i"}
ARCHIVE_SUFFIXES = (".tar", ".tar.gz", ".tgz")


class SourceError(ValueError):
    """A source that cannot be read at all (no record files, unparsable JSON)."""


class PathEscapeError(ValueError):
    """An image path that points outside the source folder."""


@dataclass(frozen=True)
class SourceRecord:
    """One record of a raw dataset, as written there (nothing checked yet)."""

    source_file: str
    """File holding the record, relative to the source folder."""
    record_index: int
    """Position in that file: array index (JSON) or line index (JSONL)."""
    id: str
    """Given id, or `<source_file>:<output image path>` for formats without ids."""
    task: str
    """"t2i" or "ti2i"."""
    prompt: str
    """The prompt or edit instruction."""
    output_image: str
    """Path of the target image, relative to the record file's folder."""
    input_images: tuple[str, ...] = ()
    """Paths of the input images (editing), relative to the record file's folder."""
    defect: str | None = None
    """Why the record is malformed, found while parsing (it is rejected with this reason)."""

    @property
    def base(self) -> str:
        """Folder of the record file, relative to the source folder."""
        return posixpath.dirname(self.source_file)


@dataclass(frozen=True)
class ImageLocation:
    """Where the bytes of one image are."""

    file: str
    """Filesystem path of the image file, or of the archive holding it."""
    member: str | None = None
    """Member name inside the archive; None for a plain file."""
    offset: int = 0
    """Start of the member's data in an uncompressed `.tar` (read in place)."""
    size: int = 0
    """Bytes of the member's data."""

    @property
    def streamed(self) -> bool:
        """A member of a compressed archive: reachable only by streaming the archive."""
        return self.member is not None and not self.file.endswith(".tar")


@dataclass(frozen=True)
class LocatedRecord:
    """A record that passed the checks, with the location of every image it needs."""

    record: SourceRecord
    output: ImageLocation
    inputs: tuple[ImageLocation, ...]
    output_path: str
    """The output image's path relative to the source folder (for reasons)."""
    input_paths: tuple[str, ...]


# --------------------------------------------------------------------------- listing


def list_source_files(uri: str) -> list[str]:
    """Every file below a source folder, as sorted paths relative to it.

    Raises:
        SourceError: the folder does not exist or is empty.
    """
    fs, root = pyarrow_filesystem(uri)
    root = root.rstrip("/")
    infos = fs.get_file_info(pafs.FileSelector(root, recursive=True, allow_not_found=True))
    files = sorted(info.path[len(root):].lstrip("/") for info in infos if info.type == pafs.FileType.File)
    if not files:
        raise SourceError(f"source folder {uri} does not exist or is empty")
    return files


def is_archive(path: str) -> bool:
    return path.endswith(ARCHIVE_SUFFIXES)


# --------------------------------------------------------------------------- records


def read_records(fmt: str, uri: str, files: list[str] | None = None) -> list[SourceRecord]:
    """Reads every record of a raw dataset.

    Args:
        fmt: "sharegpt4o", "echo4o" or "jsonl".
        uri: the source folder, local or `s3://`.
        files: `list_source_files(uri)`, when already listed.

    Raises:
        SourceError: no record files for the format, or a record file that cannot be parsed
            (the message names the file).
    """
    if fmt not in FORMATS:
        raise SourceError(f"unknown source format {fmt!r}; expected one of {', '.join(FORMATS)}")
    files = list_source_files(uri) if files is None else files
    fs, root = pyarrow_filesystem(uri)
    if fmt == "sharegpt4o":
        present = [name for name in SHAREGPT_FILES if name in files]
        if not present:
            raise SourceError(f"{uri} has neither {' nor '.join(SHAREGPT_FILES)}: not a ShareGPT-4o-Image folder")
        return [record for name in present for record in _sharegpt_records(name, _load_json(fs, root, uri, name))]
    record_files = [name for name in files if name.endswith(".jsonl")]
    if not record_files:
        raise SourceError(f"{uri} has no *.jsonl record files: not an {fmt} source")
    parse = _echo4o_record if fmt == "echo4o" else _jsonl_record
    records = []
    for name in record_files:
        for index, line in _jsonl_lines(fs, root, uri, name):
            try:
                item = json.loads(line)
            except json.JSONDecodeError as err:
                records.append(_malformed(name, index, f"line is not valid JSON ({err})"))
                continue
            records.append(parse(name, index, item))
    return records


def _read_text(fs, root: str, uri: str, name: str) -> str:
    try:
        with fs.open_input_stream(f"{root.rstrip('/')}/{name}", compression=None) as stream:
            return stream.read().decode("utf-8")
    except UnicodeDecodeError as err:
        raise SourceError(f"{uri}/{name} is not UTF-8 text: {err}") from None
    except OSError as err:
        raise SourceError(f"cannot read {uri}/{name}: {err}") from None


def _load_json(fs, root: str, uri: str, name: str) -> list:
    text = _read_text(fs, root, uri, name)
    try:
        data = json.loads(text)
    except json.JSONDecodeError as err:
        raise SourceError(f"{uri}/{name} is not valid JSON: {err}") from None
    if not isinstance(data, list):
        raise SourceError(f"{uri}/{name} must hold a JSON array of records, not a {type(data).__name__}")
    return data


def _jsonl_lines(fs, root: str, uri: str, name: str) -> Iterator[tuple[int, str]]:
    for index, line in enumerate(_read_text(fs, root, uri, name).splitlines()):
        if line.strip():
            yield index, line


def _derived_id(source_file: str, output_image: str | None, index: int) -> str:
    # Stable across runs and machines; two records with the same output image collide on purpose.
    if isinstance(output_image, str) and output_image:
        return f"{source_file}:{posixpath.normpath(output_image)}"
    return f"{source_file}#{index}"


def _malformed(source_file: str, index: int, detail: str, record_id: str | None = None) -> SourceRecord:
    return SourceRecord(source_file, index, record_id or f"{source_file}#{index}", "t2i", "", "",
                        defect=f"{MALFORMED_RECORD}: {detail}")


def _image_list(value) -> tuple[str, ...] | None:
    """An input image field as a tuple of paths; None when it is not a path or list of paths."""
    if value is None:
        return ()
    if isinstance(value, str):
        return (value,) if value else ()
    if isinstance(value, list) and all(isinstance(v, str) and v for v in value):
        return tuple(value)
    return None


def _build_record(source_file: str, index: int, item, *, prompt_key: str, task: str | None,
                  input_keys: tuple[str, ...], record_id: str | None = None) -> SourceRecord:
    if not isinstance(item, dict):
        return _malformed(source_file, index, f"expected a JSON object, got {type(item).__name__}")
    output = item.get("output_image")
    record_id = record_id or _derived_id(source_file, output, index)
    if not isinstance(output, str) or not output:
        return _malformed(source_file, index, "output_image is missing or not a path", record_id)
    prompt = item.get(prompt_key, "")
    if not isinstance(prompt, str):
        return _malformed(source_file, index, f"{prompt_key} is a {type(prompt).__name__}, not text", record_id)
    present = [key for key in input_keys if key in item]
    inputs = _image_list(item[present[0]]) if present else ()
    if inputs is None:
        return _malformed(source_file, index, f"{present[0]} is not a path or a list of paths", record_id)
    if task is None:
        task = "ti2i" if present else "t2i"
    if task == "t2i" and inputs:
        return _malformed(source_file, index, "a text-to-image record with input images", record_id)
    return SourceRecord(source_file, index, record_id, task, prompt, output, inputs)


def _sharegpt_records(name: str, data: list) -> Iterator[SourceRecord]:
    for index, item in enumerate(data):
        yield _build_record(name, index, item, prompt_key="input_prompt", task=SHAREGPT_FILES[name],
                            input_keys=("input_image",))


def _echo4o_record(name: str, index: int, item) -> SourceRecord:
    # Echo-4o marks editing records by their input images, not by `type`/`task_type`.
    return _build_record(name, index, item, prompt_key="instruction", task=None,
                         input_keys=("input_images", "input_image"))


def _jsonl_record(name: str, index: int, item) -> SourceRecord:
    record_id, task = None, None
    if isinstance(item, dict):
        record_id, task = item.get("id"), item.get("task")
        if record_id is not None and (not isinstance(record_id, str) or not record_id.strip()):
            return _malformed(name, index, f"id must be a non-empty string, got {record_id!r}")
        if task is not None and task not in ("t2i", "ti2i"):
            return _malformed(name, index, f"task must be 't2i' or 'ti2i', got {task!r}", record_id)
    return _build_record(name, index, item, prompt_key="prompt", task=task, input_keys=("input_images",),
                         record_id=record_id)


# --------------------------------------------------------------------------- image index


def resolve_image_path(base: str, path: str) -> str:
    """The path of a record's image relative to the source folder.

    Args:
        base: folder of the record file, relative to the source folder.
        path: the image path as the record gives it.

    Raises:
        PathEscapeError: an absolute path, a URI, or one that climbs out of the source folder.
    """
    if path.startswith(("/", "\\")) or "://" in path or (len(path) > 1 and path[1] == ":") or "\x00" in path:
        raise PathEscapeError(path)
    resolved = posixpath.normpath(posixpath.join(base, path))
    if resolved in (".", "..") or resolved.startswith("../"):
        raise PathEscapeError(path)
    return resolved


@dataclass
class ImageIndex:
    """Where every image of a source is: plain files first, then archive members."""

    files: dict[str, ImageLocation] = field(default_factory=dict)
    """Plain files by path relative to the source folder."""
    members: dict[str, ImageLocation] = field(default_factory=dict)
    """Archive members by every path they can be named by (see the module docstring)."""
    escaping: set[str] = field(default_factory=set)
    """Local files that are symlinks to something outside the source folder."""

    def locate(self, path: str) -> ImageLocation | None:
        return self.files.get(path) or self.members.get(path)


def archive_members(uri: str, archive: str) -> list[dict]:
    """Lists the regular-file members of one archive below a source folder.

    A `.tar` is read header by header, seeking over the data; a compressed archive has to be
    decompressed once to be listed.

    Returns:
        `{"member", "offset", "size"}` per member (offset and size locate its data in a `.tar`).

    Raises:
        SourceError: the archive is not a readable tar.
    """
    fs, root = pyarrow_filesystem(uri)
    path = f"{root.rstrip('/')}/{archive}"
    members = []
    try:
        if archive.endswith(".tar"):
            with fs.open_input_file(path) as raw, tarfile.open(fileobj=raw, mode="r:") as tar:
                for info in tar:
                    if info.isfile():
                        members.append({"member": info.name, "offset": info.offset_data, "size": info.size})
        else:
            with fs.open_input_stream(path, compression=None) as raw, tarfile.open(fileobj=raw, mode="r|*") as tar:
                for info in tar:
                    if info.isfile():
                        members.append({"member": info.name, "offset": 0, "size": info.size})
    except (tarfile.TarError, OSError, EOFError) as err:
        raise SourceError(f"cannot read archive {uri}/{archive}: {err}") from None
    return members


def build_image_index(uri: str, files: list[str], members_by_archive: dict[str, list[dict]]) -> ImageIndex:
    """Indexes the plain files and archive members of a source.

    Args:
        uri: the source folder.
        files: `list_source_files(uri)`.
        members_by_archive: `archive_members(uri, a)` for every archive `a` in `files`.
    """
    fs, root = pyarrow_filesystem(uri)
    root = root.rstrip("/")
    index = ImageIndex()
    local = isinstance(fs, pafs.LocalFileSystem)
    real_root = os.path.realpath(root) if local else None
    for name in files:
        if is_archive(name):
            continue
        if local and os.path.commonpath([real_root, os.path.realpath(f"{root}/{name}")]) != real_root:
            index.escaping.add(name)
            continue
        index.files[name] = ImageLocation(f"{root}/{name}")
    for archive in sorted(members_by_archive):
        folder = posixpath.dirname(archive)
        prefixes = [folder]
        while folder:
            folder = posixpath.dirname(folder)
            prefixes.append(folder)
        for entry in members_by_archive[archive]:
            member = posixpath.normpath(entry["member"])
            if member.startswith(("/", "../")) or member == "..":
                continue  # a member that names a place outside the archive matches no record
            location = ImageLocation(f"{root}/{archive}", entry["member"], entry["offset"], entry["size"])
            for prefix in prefixes:
                index.members.setdefault(posixpath.normpath(posixpath.join(prefix, member)), location)
    return index


# --------------------------------------------------------------------------- checks


def check_records(records: Iterable[SourceRecord], index: ImageIndex) -> tuple[list[LocatedRecord], list[Reject]]:
    """Checks what can be checked without reading an image, and locates the images.

    Rejected here: malformed records, empty prompts, editing records without an input image,
    image paths that leave the source folder (never opened), images that are nowhere in the
    source, and every record after the first with the same id.

    Returns:
        The records that passed, in source order, and the rejects.
    """
    accepted: list[LocatedRecord] = []
    rejects: list[Reject] = []
    first_seen: dict[str, SourceRecord] = {}
    for record in records:
        reason = _record_problem(record, first_seen)
        first_seen.setdefault(record.id, record)
        located = None
        if reason is None:
            located, reason = _locate(record, index)
        if reason is not None:
            rejects.append(Reject(record.source_file, record.record_index, record.id, reason))
        else:
            accepted.append(located)
    return accepted, rejects


def _record_problem(record: SourceRecord, first_seen: dict[str, SourceRecord]) -> str | None:
    if record.defect:
        return record.defect
    if record.id in first_seen:
        first = first_seen[record.id]
        return f"{DUPLICATE_ID}: {record.id} (first seen in {first.source_file} at index {first.record_index})"
    if not record.prompt.strip():
        return f"{EMPTY_PROMPT}: the prompt is empty or whitespace"
    if record.task == "ti2i" and not record.input_images:
        return f"{NO_INPUT_IMAGE}: an editing (ti2i) record needs at least one input image"
    return None


def _locate(record: SourceRecord, index: ImageIndex) -> tuple[LocatedRecord | None, str | None]:
    paths = []
    for raw in (record.output_image, *record.input_images):
        try:
            paths.append(resolve_image_path(record.base, raw))
        except PathEscapeError:
            return None, f"{PATH_ESCAPE}: {raw}"
    locations = []
    for raw, path in zip((record.output_image, *record.input_images), paths):
        if path in index.escaping:
            return None, f"{PATH_ESCAPE}: {raw} is a link to outside the source folder"
        location = index.locate(path)
        if location is None:
            return None, f"{MISSING_IMAGE}: {raw}"
        locations.append(location)
    return LocatedRecord(record, locations[0], tuple(locations[1:]), paths[0], tuple(paths[1:])), None


# --------------------------------------------------------------------------- reading images


class ImageReader:
    """Reads image bytes by location, opening each `.tar` once however many members are read."""

    def __init__(self, uri: str):
        self.fs, _ = pyarrow_filesystem(uri)
        self._archives: dict[str, object] = {}

    def read(self, location: ImageLocation) -> bytes:
        """The bytes of a plain file or of a `.tar` member (one ranged read).

        Raises:
            OSError: the file cannot be read.
        """
        if location.member is None:
            with self.fs.open_input_stream(location.file, compression=None) as stream:
                return stream.read()
        if location.streamed:
            raise ValueError(f"{location.member} is inside a compressed archive; use stream_members")
        archive = self._archives.get(location.file)
        if archive is None:
            archive = self._archives[location.file] = self.fs.open_input_file(location.file)
        data = archive.read_at(location.size, location.offset)
        if len(data) != location.size:
            raise OSError(f"{location.file} ends inside member {location.member}")
        return data

    def stream_members(self, archive: str, wanted: set[str]) -> Iterator[tuple[str, bytes]]:
        """Yields `(member name, bytes)` for the wanted members of a compressed archive, in archive order.

        Raises:
            tarfile.TarError, OSError, EOFError: the archive is corrupt or unreadable.
        """
        with self.fs.open_input_stream(archive, compression=None) as raw, tarfile.open(fileobj=raw, mode="r|*") as tar:
            for info in tar:
                if info.isfile() and info.name in wanted:
                    yield info.name, tar.extractfile(info).read()

    def close(self) -> None:
        for archive in self._archives.values():
            archive.close()
        self._archives.clear()

    def __enter__(self) -> "ImageReader":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def group_by_archive_stream(
        records: list[LocatedRecord]) -> tuple[list[LocatedRecord], dict[tuple[str, ...], list[LocatedRecord]]]:
    """Splits records into those whose images are all readable in place, and groups of records
    that need the same compressed archives (each group is read by one pass over them)."""
    direct: list[LocatedRecord] = []
    streamed: dict[tuple[str, ...], list[LocatedRecord]] = defaultdict(list)
    for located in records:
        archives = tuple(sorted({loc.file for loc in (located.output, *located.inputs) if loc.streamed}))
        if archives:
            streamed[archives].append(located)
        else:
            direct.append(located)
    return direct, dict(streamed)

