"""Finding and reading FHIR input, one file (or one slice of a file) at a time.

Inputs: a folder (searched recursively) of bundles (`.json`, `.json.gz`, one
per patient as Synthea writes them) and/or bulk-export `.ndjson` /
`.ndjson.gz` files (one resource a line), or a single such file. Other files
are counted as ignored. Nothing here holds more than one file's content: a
bundle is read whole (it must fit `max_file_mb` once decompressed); NDJSON is
streamed line by line, and a large uncompressed NDJSON file is cut into byte
ranges at line boundaries so that several workers can share it.

Speed (ingestion reads every byte of its input): gzip is inflated with ISA-L
(`isal`, ~3x zlib), and a bundle is parsed with simdjson, building Python
objects only for the resources the caller reads whole (`read_bundle`'s
`whole`): a Synthea bundle is mostly claims and explanations of benefit that
ingestion only counts. Whenever either fast path finds a problem, the reference
readers (zlib, orjson) read the file again and say what is wrong, so errors and
results are those of the reference readers.
"""

from __future__ import annotations

import itertools
import re
import zlib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import orjson
import simdjson
from isal import igzip, isal_zlib

from chronorisk.errors import InputError

BUNDLE_SUFFIXES = (".json", ".json.gz")
NDJSON_SUFFIXES = (".ndjson", ".ndjson.gz")
ACCEPTED = ".json, .json.gz, .ndjson, .ndjson.gz"
UTF8_BOM = b"\xef\xbb\xbf"
_PATIENT_LINE = re.compile(rb'"resourceType"\s*:\s*"Patient"')


def json_problem(data: bytes, exc: Exception) -> str:
    """Why `data` is not JSON, in words: UTF-16 or other non-UTF-8 text is named as such (RFC 8259 8.1: JSON
    exchanged between systems is UTF-8), else the parser's message."""
    if data[:2] in (b"\xff\xfe", b"\xfe\xff") or (len(data) >= 2 and (data[0] == 0 or data[1] == 0)):
        return "UTF-16 text, not UTF-8: JSON must be sent as UTF-8 (RFC 8259 8.1)"
    try:
        data.decode("utf-8")
    except UnicodeDecodeError as bad:
        return f"not UTF-8 text: byte 0x{data[bad.start]:02x} at offset {bad.start} (JSON must be UTF-8, RFC 8259 8.1)"
    return f"not valid JSON ({exc})"


class FileProblem(Exception):
    """A whole file (or NDJSON line) that cannot be read: `category` and a detail naming the problem."""

    def __init__(self, category: str, detail: str):
        self.category = category
        self.detail = detail
        super().__init__(f"{category}: {detail}")


@dataclass(frozen=True)
class Source:
    """One unit of input: a bundle file, an NDJSON file, or a byte range of one."""

    path: str
    name: str  # relative to the input root: what quarantine lines call the file
    kind: str  # "bundle" | "ndjson"
    size: int
    start: int = 0
    end: int | None = None

    @property
    def gz(self) -> bool:
        return self.path.endswith(".gz")

    @property
    def nbytes(self) -> int:
        return (self.end if self.end is not None else self.size) - self.start


def _kind(path: Path) -> str | None:
    name = path.name.lower()
    if name.endswith(NDJSON_SUFFIXES):
        return "ndjson"
    if name.endswith(BUNDLE_SUFFIXES):
        return "bundle"
    return None


def discover(input_path: Path) -> tuple[list[Source], int]:
    """Input files under `input_path` (sorted) and the number of other files ignored.

    Raises InputError naming the path when it does not exist or holds no FHIR file.
    """
    input_path = Path(input_path)
    if input_path.is_file():
        kind = _kind(input_path)
        if kind is None:
            raise InputError("--input", f"{input_path} is not a FHIR file; accepted: {ACCEPTED}")
        return [Source(str(input_path), input_path.name, kind, input_path.stat().st_size)], 0
    if not input_path.is_dir():
        raise InputError("--input", f"{input_path} does not exist")
    sources: list[Source] = []
    ignored = 0
    for path in sorted(input_path.rglob("*")):
        rel = path.relative_to(input_path)
        if any(part.startswith(".") for part in rel.parts) or not path.is_file():
            continue
        kind = _kind(path)
        if kind is None:
            ignored += 1
            continue
        sources.append(Source(str(path), rel.as_posix(), kind, path.stat().st_size))
    if not sources:
        raise InputError(
            "--input", f"{input_path} holds no FHIR files ({ACCEPTED}); {ignored} other file(s) found"
        )
    return sources, ignored


def split_ndjson(source: Source, chunk_bytes: int) -> list[Source]:
    """Cut an uncompressed NDJSON file into byte ranges of about `chunk_bytes` (gzip cannot be cut)."""
    if source.kind != "ndjson" or source.gz or source.size <= chunk_bytes:
        return [source]
    bounds = [*range(0, source.size, chunk_bytes), source.size]
    return [
        Source(source.path, source.name, source.kind, source.size, start, end)
        for start, end in itertools.pairwise(bounds)
    ]


def plan_tasks(sources: list[Source], task_bytes: int, workers: int, max_files: int = 512) -> list[list[Source]]:
    """Group sources into tasks of about `task_bytes` (smaller when the input is small,
    so that every worker gets several tasks)."""
    total = sum(s.nbytes for s in sources)
    target = max(1, min(task_bytes, total // max(1, 4 * workers)))
    pieces = [piece for s in sources for piece in split_ndjson(s, target)]
    tasks: list[list[Source]] = []
    current: list[Source] = []
    size = 0
    for piece in pieces:
        current.append(piece)
        size += piece.nbytes
        if size >= target or len(current) >= max_files:
            tasks.append(current)
            current, size = [], 0
    if current:
        tasks.append(current)
    return tasks


def _inflate(inflater_module, data: bytes, max_bytes: int) -> bytes:
    """Decompress (possibly multi-member) gzip data with `inflater_module` (zlib's API), refusing more than
    `max_bytes`."""
    out: list[bytes] = []
    total = 0
    while data:
        inflater = inflater_module.decompressobj(wbits=31)
        chunk = inflater.decompress(data, max_bytes + 1 - total)
        total += len(chunk)
        out.append(chunk)
        if total > max_bytes:
            raise FileProblem("oversize", f"decompresses to more than max_file_mb ({max_bytes / 1e6:g} MB)")
        if not inflater.eof:
            raise FileProblem("bad_gzip", "gzip data is truncated")
        data = inflater.unused_data
    return b"".join(out)


def _gunzip(data: bytes, max_bytes: int) -> bytes:
    """Decompress gzip data (ISA-L; on any problem zlib decides, and names it); zlib.error if not gzip."""
    try:
        return _inflate(isal_zlib, data, max_bytes)
    except (isal_zlib.error, FileProblem):
        return _inflate(zlib, data, max_bytes)


def _python(value: object) -> object:
    """A simdjson value as the Python value orjson would have built."""
    if isinstance(value, simdjson.Object):
        return value.as_dict()
    if isinstance(value, simdjson.Array):
        return value.as_list()
    return value


_PARSER = simdjson.Parser()  # one per process (a worker reads one file at a time); it keeps its buffers


def _lean_bundle(data: bytes, whole: frozenset[str], kept_keys: tuple[str, ...]) -> dict | None:
    """The Bundle in `data` as `{"resourceType": "Bundle", "entry": [...]}`, each entry as
    `{"fullUrl", "resource"}`, a resource whose resourceType is not in `whole` holding only its resourceType
    and `kept_keys`; None when this is not plainly a Bundle of entries, or simdjson refuses the bytes
    (orjson then reads it and decides)."""
    try:
        doc = _PARSER.parse(data)  # (all its objects are gone when this returns: the parser can be re-used)
        if not isinstance(doc, simdjson.Object) or doc.get("resourceType") != "Bundle":
            return None
        entries = doc.get("entry", [])
        if not isinstance(entries, simdjson.Array):
            return None
        lean = []
        for entry in entries:
            if not isinstance(entry, simdjson.Object):
                lean.append(_python(entry))
                continue
            resource = entry.get("resource")
            if isinstance(resource, simdjson.Object):
                rtype = resource.get("resourceType")
                if isinstance(rtype, str) and rtype and rtype not in whole:
                    part = {"resourceType": rtype}
                    present = set(resource.keys())  # (a missing key costs simdjson an exception: look once)
                    for key in kept_keys:
                        if key in present:
                            part[key] = _python(resource[key])
                    resource = part
                else:
                    resource = resource.as_dict()
            else:
                resource = _python(resource)
            url = entry.get("fullUrl")  # (a string, or None, but for a malformed entry)
            lean.append({"fullUrl": url if url is None or isinstance(url, str) else _python(url), "resource": resource})
        return {"resourceType": "Bundle", "entry": lean}
    except (ValueError, RuntimeError, KeyError, TypeError):  # invalid JSON (UnicodeDecodeError is a ValueError)
        return None


def read_bundle(source: Source, max_bytes: int, whole: frozenset[str] | None = None,
                kept_keys: tuple[str, ...] = ()) -> dict:
    """The parsed Bundle of a `.json` / `.json.gz` file; FileProblem if it cannot be one.

    With `whole`, only the resources of those types are built whole; any other resource (a resourceType
    string not in `whole`) holds its resourceType and those of `kept_keys` it has, and each entry only
    `fullUrl` and `resource`."""
    if source.size > max_bytes:
        raise FileProblem("oversize", f"file is {source.size / 1e6:.1f} MB, over max_file_mb ({max_bytes / 1e6:g} MB)")
    try:
        with open(source.path, "rb") as fh:
            data = fh.read()
    except OSError as exc:
        raise FileProblem("unreadable", f"cannot be read ({exc.strerror or type(exc).__name__})") from None
    if source.gz:
        try:
            data = _gunzip(data, max_bytes)
        except zlib.error as exc:
            raise FileProblem("bad_gzip", f"not valid gzip ({exc})") from None
    if data.startswith(UTF8_BOM):  # RFC 8259 8.1: a parser may ignore it
        data = data[3:]
    if whole is not None:
        lean = _lean_bundle(data, whole, kept_keys)
        if lean is not None:
            return lean
    try:
        doc = orjson.loads(data)
    except orjson.JSONDecodeError as exc:
        raise FileProblem("not_json", json_problem(data, exc)) from None
    if not isinstance(doc, dict):
        raise FileProblem("not_a_bundle", f"JSON {type(doc).__name__} is not a FHIR Bundle object")
    if doc.get("resourceType") != "Bundle":
        raise FileProblem(
            "not_a_bundle", f"resourceType is {doc.get('resourceType')!r}, not 'Bundle'"
        )
    entries = doc.get("entry", [])
    if not isinstance(entries, list):
        raise FileProblem("not_a_bundle", "Bundle.entry is not a list")
    return doc


def ndjson_lines(source: Source) -> Iterator[tuple[int, bytes]]:
    """(byte offset, line) of the lines that start in the source's byte range.

    For gzip files the offset is in the decompressed stream. Blank lines are
    skipped. Raises FileProblem when the file cannot be opened or decompressed.
    """
    try:
        fh = igzip.open(source.path, "rb") if source.gz else open(source.path, "rb")  # noqa: SIM115
    except OSError as exc:
        raise FileProblem("unreadable", f"cannot be read ({exc.strerror or type(exc).__name__})") from None
    with fh:
        pos = source.start
        try:
            if source.start > 0:
                fh.seek(source.start - 1)
                pos = source.start - 1 + len(fh.readline())  # the line straddling `start` is the previous range's
            end = source.end if source.end is not None else float("inf")
            while pos < end:
                line = fh.readline()
                if not line:
                    break
                offset, pos = pos, pos + len(line)
                if offset == 0 and line.startswith(UTF8_BOM):
                    line = line[3:]
                if line.strip():
                    yield offset, line
        except (OSError, EOFError, zlib.error, isal_zlib.error) as exc:
            raise FileProblem("bad_gzip", f"cannot be decompressed past byte {pos} ({exc})") from None


def export_patient_ids(sources: list[Source]) -> frozenset[str] | None:
    """The ids of the Patients in the NDJSON sources (a bulk export's files), or None if there is no
    NDJSON source. Lines that cannot be read are left to the conversion, which quarantines them."""
    files = {s.path: s for s in sources if s.kind == "ndjson"}
    if not files:
        return None
    ids: set[str] = set()
    for path in sorted(files):
        try:
            for _, line in ndjson_lines(Source(path, files[path].name, "ndjson", files[path].size)):
                if _PATIENT_LINE.search(line) is None:
                    continue
                try:
                    resource = orjson.loads(line)
                except orjson.JSONDecodeError:
                    continue
                if not isinstance(resource, dict) or resource.get("resourceType") != "Patient":
                    continue
                rid = resource.get("id")
                if isinstance(rid, str) and rid:
                    ids.add(rid)
        except FileProblem:
            continue
    return frozenset(ids)
