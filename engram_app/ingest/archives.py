"""Zip archives: a folder of files in one file, or the export a chat app sends.

A zip comes from anywhere, so nothing in it is trusted. Before its directory is read, its end
record must declare no more entries than :attr:`ParseLimits.archive_members` (``zipfile`` turns
every entry into an object of ~450 bytes before anyone can count them: a 50 MB archive of empty
entries costs 300 MB). Each member is then refused, with its reason, when its name leaves the
archive (``..``, an absolute path), it is a link or encrypted, it is larger than a file may be,
it unpacks more than :attr:`ParseLimits.compression_ratio` times its packed size (a zip bomb),
or the archive's members together pass :attr:`ParseLimits.archive_expanded`. Members are read
in bounded chunks (a member that unpacks past what it declared is cut off) and never written
to disk under their own names. An archive inside an archive is opened as deep as
:attr:`ParseLimits.archive_depth`.

What an archive is decides how it is imported (:func:`classify`):

- ``word``: a ``.docx`` (``word/document.xml``), one document;
- ``export``: ChatGPT's or Claude's export (a ``conversations.json`` at its top, or in its one
  folder), or WhatsApp's (one chat ``.txt`` beside its media): one chat source, the rest of the
  archive skipped with a note (:func:`parse_export`);
- ``files``: anything else, whose members the library imports as sources of their own.
"""

from __future__ import annotations

import io
import stat
import struct
import zipfile
import zlib
from dataclasses import dataclass
from pathlib import PurePath, PurePosixPath

from engram_app.ingest import exports, whatsapp
from engram_app.ingest.decode import decode_text
from engram_app.ingest.limits import DEFAULT_LIMITS, ParseLimits
from engram_app.ingest.records import ImportRejected, Parsed, plural

ZIP_MAGIC = b"PK\x03\x04"
CHUNK = 1 << 20
RATIO_CHECKED_ABOVE = 1 << 20  # smaller members cannot make a bomb, whatever their ratio
SNIFF_BYTES = 64 * 1024  # read of a member to recognise an export, before anything is parsed
# A directory entry is 46 bytes plus its name and extra fields; allow a generous average per entry.
DIRECTORY_BYTES_PER_ENTRY = 1024
ARCHIVE_SUFFIXES = ("", ".zip")


def is_zip(data: bytes) -> bool:
    return data.startswith(ZIP_MAGIC)


def describe(n: float) -> str:
    return f"{n / 2**30:g} GiB" if n >= 2**30 else f"{n / 2**20:g} MB"


# --- opening -------------------------------------------------------------------------------------


def _declared_directory(data: bytes) -> tuple[int, int]:
    """(entries, directory bytes) from the archive's end record, the zip64 one when present.

    ``zipfile`` reads the directory by its size in bytes, so both are checked: an archive that
    declares few entries in a large directory is refused too.
    """
    end = data.rfind(b"PK\x05\x06", max(0, len(data) - 65_557))
    if end < 0 or len(data) < end + 22:
        raise ImportRejected("the zip archive is damaged or truncated (it has no end record): download it again")
    entries, size = struct.unpack("<HI", data[end + 10:end + 16])
    locator = end - 20
    if locator >= 56 and data[locator:locator + 4] == b"PK\x06\x07":  # zip64: the real figures are earlier
        record = locator - 56
        if data[record:record + 4] == b"PK\x06\x06":
            entries, size = struct.unpack("<QQ", data[record + 32:record + 48])
    return entries, size


def open_zip(data: bytes, limits: ParseLimits = DEFAULT_LIMITS, what: str = "the zip archive") -> zipfile.ZipFile:
    """The archive in ``data``, once its directory is known to be within the limits."""
    entries, directory = _declared_directory(data)
    if entries > limits.archive_members or directory > limits.archive_members * DIRECTORY_BYTES_PER_ENTRY:
        raise ImportRejected(f"{what} holds more than {limits.archive_members:,} files (it declares {entries:,}), the "
                             "most read from one archive: unzip it and import its folders one by one")
    try:
        archive = zipfile.ZipFile(io.BytesIO(data))
    except (zipfile.BadZipFile, zlib.error, OSError, ValueError, NotImplementedError, EOFError) as exc:
        raise ImportRejected(f"{what} is damaged or truncated ({exc}): download it again"[:300]) from None
    count = len(archive.infolist())
    if count > limits.archive_members:
        raise ImportRejected(f"{what} holds {count:,} files, more than the {limits.archive_members:,} read from one "
                             "archive: unzip it and import its folders one by one")
    return archive


# --- members -------------------------------------------------------------------------------------


class Budget:
    """The bytes an archive's members (nested archives' too) may still unpack to."""

    def __init__(self, limits: ParseLimits):
        self.left = limits.archive_expanded
        self.total = limits.archive_expanded

    def take(self, n: int) -> None:
        if n > self.left:
            raise ImportRejected(f"the archive's files together unpack to more than {describe(self.total)}, the most "
                                 "read from one archive: this file was not imported; unzip the archive and import "
                                 "the rest")
        self.left -= n


def skipped(info: zipfile.ZipInfo) -> bool:
    """Folders, hidden files and macOS's resource forks: skipped, as a folder walk skips them."""
    parts = PurePosixPath(info.filename.replace("\\", "/")).parts
    hidden = any(p.startswith(".") and p != ".." for p in parts)  # "..": refused by member_problem, not hidden
    return info.is_dir() or not parts or parts[0] == "__MACOSX" or hidden


def member_problem(info: zipfile.ZipInfo, max_bytes: int, limits: ParseLimits) -> str | None:
    """Why a member is refused before a byte of it is read, or None."""
    name = info.filename
    path = name.replace("\\", "/")
    if any(ord(ch) < 32 for ch in name):
        return "its name holds control characters: refused"
    if path.startswith("/") or PurePath(path).drive or (len(path) > 1 and path[1] == ":"):
        return f"its name is an absolute path ({name!r}), which would leave the archive: refused"
    if ".." in PurePosixPath(path).parts:
        return f"its name {name!r} climbs out of the archive with '..' (path traversal): refused"
    if stat.S_ISLNK(info.external_attr >> 16):
        return "it is a symbolic link, which could point anywhere on the machine: refused"
    if info.flag_bits & 0x1:
        return "it is encrypted with a password: unzip it yourself and import the file"
    if info.file_size > max_bytes:
        return (f"it unpacks to {info.file_size / 2**20:.2f} MB; the limit for one file is {max_bytes / 2**20:.2f} MB "
                "(change it with --max-size)")
    if info.file_size > RATIO_CHECKED_ABOVE and info.file_size > limits.compression_ratio * max(info.compress_size, 1):
        return (f"it unpacks to {info.file_size / max(info.compress_size, 1):,.0f} times its packed size (more than "
                f"{limits.compression_ratio:g} times): refused as a possible zip bomb")
    return None


def read_member(archive: zipfile.ZipFile, info: zipfile.ZipInfo, cap: int, budget: Budget | None = None) -> bytes:
    """A member's bytes in chunks, refused as soon as they pass ``cap`` or the budget, whatever its header says."""
    if budget is not None:
        budget.take(info.file_size)
    chunks, seen = [], 0
    try:
        with archive.open(info) as stream:
            while chunk := stream.read(CHUNK):
                seen += len(chunk)
                if seen > min(cap, info.file_size):
                    raise ImportRejected("it unpacks to more bytes than its header declares: refused as a possible "
                                         "zip bomb")
                chunks.append(chunk)
    except (zipfile.BadZipFile, zlib.error, EOFError, RuntimeError, NotImplementedError, OSError, ValueError) as exc:
        raise ImportRejected(f"it cannot be unpacked ({type(exc).__name__}: {exc})"[:300]) from None
    return b"".join(chunks)


def _sniff(archive: zipfile.ZipFile, info: zipfile.ZipInfo) -> bytes:
    """The first bytes of a member, to recognise what it is (bounded: at most SNIFF_BYTES are unpacked)."""
    try:
        with archive.open(info) as stream:
            return stream.read(SNIFF_BYTES)
    except (zipfile.BadZipFile, zlib.error, EOFError, RuntimeError, NotImplementedError, OSError, ValueError):
        return b""


# --- what an archive is --------------------------------------------------------------------------


@dataclass
class Export:
    app: str  # chatgpt | claude | whatsapp
    member: zipfile.ZipInfo  # the file holding the chats
    others: list[str]  # everything else in the archive, skipped


def _path(info: zipfile.ZipInfo) -> PurePosixPath:
    return PurePosixPath(info.filename.replace("\\", "/"))


def find_export(archive: zipfile.ZipFile) -> Export | None:
    """The chat export an archive is, from its names and the first bytes of its chat file."""
    infos = [i for i in archive.infolist() if not i.is_dir()]
    visible = [i for i in infos if not skipped(i)]
    for info in visible:
        path = _path(info)
        if path.name == "conversations.json" and len(path.parts) <= 2:
            head = _sniff(archive, info)
            app = "chatgpt" if b'"mapping"' in head else "claude" if b'"chat_messages"' in head else None
            if app:
                return Export(app, info, [i.filename for i in visible if i is not info])
    texts = [i for i in visible if _path(i).suffix.lower() == ".txt"]
    if len(texts) == 1 and whatsapp.looks_like_whatsapp(_sniff(archive, texts[0]).decode("utf-8", "replace")):
        return Export("whatsapp", texts[0], [i.filename for i in visible if i is not texts[0]])
    return None


def classify(data: bytes, filename: str, limits: ParseLimits = DEFAULT_LIMITS) -> str:
    """``word``, ``export`` or ``files`` (see the module's docstring); refuses a zip named as something else."""
    with open_zip(data, limits) as archive:
        names = {i.filename for i in archive.infolist()}
        if "word/document.xml" in names:
            return "word"
        if find_export(archive) is not None:
            return "export"
    suffix = PurePath(filename).suffix.lower()
    if suffix == ".docx":
        raise ImportRejected("the zip archive is not a Word document (no word/document.xml)")
    if suffix not in ARCHIVE_SUFFIXES:
        raise ImportRejected(f"the file is named {suffix} but is a zip archive: rename it to .zip to import the files "
                             "in it")
    return "files"


def parse_export(data: bytes, name: str, kind: str, limits: ParseLimits = DEFAULT_LIMITS) -> Parsed:
    """The chats of a chat app's export archive; the rest of the archive is named in a warning."""
    with open_zip(data, limits) as archive:
        export = find_export(archive)
        if export is None:
            raise ImportRejected("this zip archive is a folder of files, not one file: the library imports each file "
                                 "in it (ingest the .zip)")
        if kind not in ("auto", "chat"):
            raise ImportRejected(f"a chat export can only be imported as a chat, not as a {kind}")
        problem = member_problem(export.member, limits.archive_member_bytes, limits)
        if problem:
            raise ImportRejected(f"{export.member.filename} in the archive: {problem}")
        content = read_member(archive, export.member, limits.archive_member_bytes)
    if export.app == "whatsapp":
        parsed = whatsapp.parse(decode_text(content), PurePath(export.member.filename).stem or name)
        media = [n for n in export.others if whatsapp.is_media_name(n)]
        rest = [n for n in export.others if n not in media]
        if media:
            parsed.warnings.append(f"{plural(len(media), 'media file')} in the archive not imported (only "
                                   f"the chat's text is): {_names(media)}")
        if rest:
            parsed.warnings.append(f"{plural(len(rest), 'other file')} in the archive not imported: "
                                   f"{_names(rest)}")
        return parsed
    parsed = exports.parse_conversations(content, name, export.app)
    if export.others:
        parsed.warnings.append(f"{plural(len(export.others), 'other file')} of the export not imported "
                               f"(account data, the HTML copy of the chats, images, audio): {_names(export.others)}")
    return parsed


def _names(names: list[str], shown: int = 5) -> str:
    more = f" and {len(names) - shown} more" if len(names) > shown else ""
    return ", ".join(names[:shown]) + more
