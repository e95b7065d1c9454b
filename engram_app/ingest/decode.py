"""Bytes to text: byte-order marks, UTF-8, other encodings (charset-normalizer), binaries refused."""

from __future__ import annotations

import unicodedata

from charset_normalizer import from_bytes

from engram_app.ingest.records import ImportRejected

PREFERRED = ["utf_8", "cp1252", "latin_1", "iso8859_15", "utf_16", "shift_jis", "gb18030", "big5", "euc_kr", "cp1251"]
_BOMS = [(b"\xef\xbb\xbf", "utf-8"), (b"\xff\xfe", "utf-16-le"), (b"\xfe\xff", "utf-16-be")]


def looks_binary(data: bytes) -> bool:
    """NUL bytes or many control characters in the first 8 KiB (and no UTF-16 BOM)."""
    head = data[:8192]
    if any(head.startswith(bom) for bom, enc in _BOMS if enc.startswith("utf-16")):
        return False
    if b"\0" in head:
        return True
    controls = sum(1 for b in head if b < 32 and b not in (9, 10, 12, 13))
    return controls > 0.05 * max(len(head), 1)


def decode_text(data: bytes) -> str:
    """Decode a text file, whatever its encoding; NFC-normalise; refuse binaries."""
    if not data.strip():
        raise ImportRejected("the file is empty")
    for bom, encoding in _BOMS:
        if data.startswith(bom):
            try:
                return _clean(data[len(bom):].decode(encoding))
            except UnicodeDecodeError as exc:
                raise ImportRejected(f"the file starts with a {encoding} marker but is not valid {encoding}") from exc
    if looks_binary(data):
        raise ImportRejected("this is a binary file, not text (wrong extension?)")
    try:
        return _clean(data.decode("utf-8"))
    except UnicodeDecodeError:
        pass
    matches = list(from_bytes(data))
    if not matches:
        raise ImportRejected("the text encoding could not be recognised")
    # charset-normalizer often finds several single-byte code pages equally plausible; on a tie,
    # prefer the ones most text is actually written in.
    best = min(matches, key=lambda m: (m.chaos, -m.coherence, PREFERRED.index(m.encoding) if m.encoding in PREFERRED
                                       else len(PREFERRED)))
    return _clean(str(best))


def _clean(text: str) -> str:
    text = unicodedata.normalize("NFC", text.replace("\r\n", "\n").replace("\r", "\n"))
    if not text.strip():
        raise ImportRejected("the file has no text")
    return text
