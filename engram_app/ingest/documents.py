"""Documents: plain text, Markdown, reStructuredText, HTML (Beautiful Soup), PDF (pypdf), Word (python-docx)."""

from __future__ import annotations

import io
import logging
import re
import zipfile

from engram_app.ingest.limits import DEFAULT_LIMITS, ParseLimits, too_many_chars
from engram_app.ingest.records import ImportRejected, Parsed, Record

log = logging.getLogger(__name__)

MAX_PDF_PAGES = 2000
# A .docx is a zip: refuse archives that would expand past this (zip bombs), or hold too many parts.
MAX_DOCX_EXPANDED = 200 * 2**20
MAX_DOCX_MEMBERS = 5000


def _title(text: str, fallback: str) -> str:
    for line in text.splitlines():
        line = line.strip().lstrip("#").strip()
        if line:
            return line[:120]
    return fallback


def plain(text: str, fmt: str, name: str) -> Parsed:
    text = text.strip()
    return Parsed("document", fmt, _title(text, name), [Record("text", text)])


def html(text: str, name: str) -> Parsed:
    from bs4 import BeautifulSoup

    soup = BeautifulSoup(text, "html.parser")
    for tag in soup(["script", "style", "noscript", "template"]):
        tag.decompose()
    title = soup.title.get_text(strip=True) if soup.title else ""
    body = soup.get_text("\n")
    body = re.sub(r"\n\s*\n+", "\n\n", body).strip()
    if not body:
        raise ImportRejected("the HTML page has no visible text")
    return Parsed("document", "html", title[:120] or _title(body, name), [Record("text", body)])


def _content_streams(page) -> list:
    """A page's content streams: ``/Contents`` is one stream or an array of them, mostly by reference."""
    from pypdf.generic import ArrayObject, IndirectObject

    contents = page.raw_get("/Contents") if "/Contents" in page else None
    if isinstance(contents, IndirectObject) and isinstance(contents.get_object(), ArrayObject):
        contents = contents.get_object()
    if contents is None:
        return []
    return list(contents) if isinstance(contents, ArrayObject) else [contents]


def _content_bytes(pages) -> int:
    """The bytes of drawing instructions pypdf would parse to extract the text of ``pages``.

    Text extraction parses each page's content streams, and its time grows faster than their
    size. A stream several pages share is parsed once per page, so it counts once per page
    here; each distinct stream is decompressed once to measure it.
    """
    from pypdf.generic import IndirectObject, StreamObject

    sizes: dict = {}
    total = 0
    for page in pages:
        for ref in _content_streams(page):
            key = (ref.idnum, ref.generation) if isinstance(ref, IndirectObject) else id(ref)
            if key not in sizes:
                stream = ref.get_object()
                sizes[key] = len(stream.get_data()) if isinstance(stream, StreamObject) else 0
            total += sizes[key]
    return total


def pdf(data: bytes, name: str, limits: ParseLimits = DEFAULT_LIMITS) -> Parsed:
    from pypdf import PdfReader
    from pypdf.errors import LimitReachedError, PdfReadError

    try:
        reader = PdfReader(io.BytesIO(data))
        if reader.is_encrypted:
            try:
                if not reader.decrypt(""):
                    raise ImportRejected("the PDF is encrypted with a password: save an unprotected copy and import that")
            except ImportRejected:
                raise
            except Exception as exc:  # pypdf raises several types for unsupported encryption
                raise ImportRejected(f"the PDF is encrypted and cannot be opened ({exc})") from exc
        pages = reader.pages
        if len(pages) > MAX_PDF_PAGES:
            raise ImportRejected(f"the PDF has {len(pages)} pages; at most {MAX_PDF_PAGES} are imported at once")
        content = _content_bytes(pages)
        if content > limits.max_pdf_content:
            raise ImportRejected(
                f"the PDF's pages hold {content / 2**20:,.0f} MB of drawing instructions (a content stream "
                f"shared by many pages counts once per page); at most {limits.max_pdf_content / 2**20:g} MB are "
                "read from one file, more would take hours: print it to a new PDF or save it as text")
        texts, chars = [], 0
        for page in pages:
            texts.append((page.extract_text() or "").strip())
            chars += len(texts[-1])
            if chars > limits.max_chars:
                raise ImportRejected(too_many_chars(limits))
        metadata_title = (reader.metadata.title if reader.metadata else None) or ""
    except ImportRejected:
        raise
    except LimitReachedError as exc:  # pypdf's own guard against decompression bombs
        raise ImportRejected(f"the PDF holds a stream that expands past pypdf's safety limit ({exc})"[:300]) from exc
    except (PdfReadError, ValueError, KeyError, TypeError, AttributeError, IndexError, OSError, RecursionError,
            AssertionError, ZeroDivisionError) as exc:
        raise ImportRejected(f"the PDF is damaged or truncated ({type(exc).__name__}: {exc})"[:300]) from exc
    body = "\n\n".join(t for t in texts if t)
    if not body:
        raise ImportRejected("the PDF has no extractable text (a scan? it would need OCR)")
    return Parsed("document", "pdf", str(metadata_title)[:120] or _title(body, name), [Record("text", body)])


def docx(data: bytes, name: str) -> Parsed:
    try:
        archive = zipfile.ZipFile(io.BytesIO(data))
        members = archive.infolist()
    except (zipfile.BadZipFile, OSError, ValueError) as exc:
        raise ImportRejected("the .docx file is not a valid Word document (not a zip archive)") from exc
    if len(members) > MAX_DOCX_MEMBERS or sum(m.file_size for m in members) > MAX_DOCX_EXPANDED:
        raise ImportRejected("the .docx file would expand to more than 200 MB: refused as a possible zip bomb")
    if "word/document.xml" not in {m.filename for m in members}:
        raise ImportRejected("the zip archive is not a Word document (no word/document.xml)")
    import docx as python_docx

    try:
        document = python_docx.Document(io.BytesIO(data))
    except Exception as exc:  # python-docx raises lxml, KeyError, ValueError... for damaged files
        raise ImportRejected(f"the Word document is damaged ({type(exc).__name__}: {exc})"[:300]) from exc
    parts = [p.text for p in document.paragraphs if p.text.strip()]
    for table in document.tables:
        for row in table.rows:
            cells = [c.text.strip() for c in row.cells if c.text.strip()]
            if cells:
                parts.append(" | ".join(cells))
    body = "\n\n".join(parts).strip()
    if not body:
        raise ImportRejected("the Word document has no text")
    title = (document.core_properties.title or "").strip()
    return Parsed("document", "docx", title[:120] or _title(body, name), [Record("text", body)])
