"""Files of every format the library imports, and a corpus of malformed or hostile ones, all made
in the test run (the PDF with fpdf2, the Word files with python-docx, as the issue asks)."""

from __future__ import annotations

import gzip
import io
import json
import zipfile
from pathlib import Path

CHATGPT_EXPORT = [
    {
        "title": "Planning a trip",
        "current_node": "a2b",
        "mapping": {
            "root": {"id": "root", "message": None, "parent": None, "children": ["sys"]},
            "sys": {"id": "sys", "parent": "root", "children": ["u1"],
                    "message": {"author": {"role": "system"}, "content": {"content_type": "text", "parts": ["You are ChatGPT."]}}},
            "u1": {"id": "u1", "parent": "sys", "children": ["a1", "a1b"],
                   "message": {"author": {"role": "user"}, "content": {"content_type": "text", "parts": ["I want to visit Lisbon in May with my dog Pixel."]}}},
            # Two branches: the user regenerated the answer; the export's current_node is on the second.
            "a1": {"id": "a1", "parent": "u1", "children": [],
                   "message": {"author": {"role": "assistant"}, "content": {"content_type": "text", "parts": ["ABANDONED BRANCH answer."]}}},
            "a1b": {"id": "a1b", "parent": "u1", "children": ["u2"],
                    "message": {"author": {"role": "assistant"}, "content": {"content_type": "text", "parts": ["Lisbon in May is lovely; many cafes welcome dogs."]}}},
            "u2": {"id": "u2", "parent": "a1b", "children": ["a2", "a2b"],
                   "message": {"author": {"role": "user"}, "content": {"content_type": "text", "parts": ["Which neighbourhood should we stay in?"]}}},
            "a2": {"id": "a2", "parent": "u2", "children": [],
                   "message": {"author": {"role": "assistant"}, "content": {"content_type": "text", "parts": ["ANOTHER ABANDONED answer."]}}},
            "a2b": {"id": "a2b", "parent": "u2", "children": [],
                    "message": {"author": {"role": "assistant"}, "content": {"content_type": "text", "parts": ["Try Alfama: hilly, quiet, close to the river."]}}},
        },
    },
    {
        "title": "Cooking",
        "mapping": {  # an older export without current_node: the last child is followed
            "r": {"id": "r", "message": None, "parent": None, "children": ["q"]},
            "q": {"id": "q", "parent": "r", "children": ["x"],
                  "message": {"author": {"role": "user"}, "content": {"parts": ["My favourite dish is bacalhau."]}}},
            "x": {"id": "x", "parent": "q", "children": [],
                  "message": {"author": {"role": "assistant"}, "content": {"parts": ["A classic! Try it with chickpeas."]}}},
        },
    },
]

PERSONA_CSV = (
    "user 1 personas,user 2 personas,Best Generated Conversation\n"
    '"I have a turtle named Timothy.\nI love hiking.","I am a nurse.\nI live in Lisbon.",'
    '"User 1: Hi! I just got back from a hike.\nUser 2: Nice! I only hike after my night shifts at the hospital.\n'
    'User 1: My turtle Timothy stays home, of course."\n'
    '"I play the violin.","I have two cats.","User 1: Do you like music?\nUser 2: Yes, and my cats do too."\n'
)


def make_pdf(text_pages: list[str]) -> bytes:
    from fpdf import FPDF

    pdf = FPDF()
    pdf.set_title("A PDF document")
    for text in text_pages:
        pdf.add_page()
        pdf.set_font("helvetica", size=12)
        if text:
            pdf.multi_cell(0, 8, text)
    return bytes(pdf.output())


def make_docx(paragraphs: list[str], title: str = "") -> bytes:
    import docx

    document = docx.Document()
    if title:
        document.core_properties.title = title
    for p in paragraphs:
        document.add_paragraph(p)
    buffer = io.BytesIO()
    document.save(buffer)
    return buffer.getvalue()


def valid_files(folder: Path) -> dict[str, dict]:
    """Write one file per supported format; returns name -> what the import must give."""
    folder.mkdir(parents=True, exist_ok=True)
    files: dict[str, tuple[bytes, dict]] = {
        "notes.txt": (b"The garden has three apple trees.\nThey were planted in 2019 along the south wall.\n", {"kind": "document", "format": "txt", "contains": "apple trees"}),
        "latin1.txt": ("Caf\u00e9 cr\u00e8me and cr\u00eapes in the morning, na\u00efvely.\n".encode("latin-1") * 3,
                       {"kind": "document", "format": "txt", "contains": "Caf\u00e9 cr\u00e8me"}),
        "readme.md": (b"# Project Heron\n\nHeron is a **bird-watching** log.\n\n- counts birds\n- maps sightings\n",
                      {"kind": "document", "format": "markdown", "contains": "bird-watching", "title": "Project Heron"}),
        "guide.rst": (b"Guide\n=====\n\nThe reStructuredText guide explains *emphasis*.\n", {"kind": "document", "format": "rst", "contains": "reStructuredText"}),
        "page.html": (b"<!doctype html><html><head><title>My page</title><script>var x = 'SCRIPTTEXT';</script></head>"
                      b"<body><h1>Hello &amp; welcome</h1><p>I collect <b>stamps</b> from Japan.</p></body></html>",
                      {"kind": "document", "format": "html", "contains": "I collect", "absent": "SCRIPTTEXT", "title": "My page"}),
        "report.pdf": (make_pdf(["The quarterly report shows growth in Porto.", "Page two mentions the harbour."]),
                       {"kind": "document", "format": "pdf", "contains": "harbour"}),
        "letter.docx": (make_docx(["Dear Ana,", "The meeting moves to Thursday at the library."], title="Letter to Ana"),
                        {"kind": "document", "format": "docx", "contains": "Thursday", "title": "Letter to Ana"}),
        "data.json": (json.dumps({"items": [{"sku": "A1", "description": "blue kettle"}], "count": 1}).encode(),
                      {"kind": "document", "format": "json-text", "contains": "blue kettle"}),
        "table.csv": (b"city,population\nLisbon,545000\nPorto,232000\n", {"kind": "document", "format": "csv-text", "contains": "Porto"}),
        "conversations.json": (json.dumps(CHATGPT_EXPORT).encode(),
                               {"kind": "chat", "format": "chatgpt", "contains": "Alfama", "absent": "ABANDONED",
                                "speakers": {"user", "assistant"}}),
        "messages.json": (json.dumps([{"role": "user", "content": "My sister is called Joana."},
                                      {"role": "assistant", "content": "Nice to know about Joana!"}]).encode(),
                          {"kind": "chat", "format": "messages", "contains": "Joana", "speakers": {"user", "assistant"}}),
        "chat.jsonl": (b'{"role": "user", "content": "I drive a green van."}\n{"role": "assistant", "content": "Noted: green van."}\n',
                       {"kind": "chat", "format": "jsonl-messages", "contains": "green van"}),
        "transcript.txt": (b"User 1: I just adopted a parrot.\nUser 2: What is its name?\nUser 1: Kiwi. She talks a lot.\n",
                           {"kind": "chat", "format": "transcript", "contains": "Kiwi", "speakers": {"User 1", "User 2"}}),
        "me.json": (json.dumps({"name": "Maria Silva", "city": "Lisbon", "pets": ["Pixel the dog"], "job": "nurse"}).encode(),
                    {"kind": "profile", "format": "profile-json", "contains": "Lisbon", "person": "Maria Silva"}),
        "me.yaml": (b"name: Tom\nfavourite_food: pizza\nhobbies:\n  - hiking\n  - chess\n",
                    {"kind": "profile", "format": "profile-yaml", "contains": "chess", "person": "Tom"}),
        "about-me.md": (b"# Maria\n\n- I have a turtle named Timothy.\n- My favourite colour is teal.\n- I work night shifts.\n",
                        {"kind": "profile", "format": "statements", "contains": "Timothy", "person": "Maria"}),
        "personas.csv": (PERSONA_CSV.encode(), {"kind": "profile", "format": "persona-csv", "contains": "Timothy",
                                                "speakers": {"User 1", "User 2"}}),
    }
    expected = {}
    for name, (data, info) in files.items():
        (folder / name).write_bytes(data)
        expected[name] = info
    return expected


def hostile_files(folder: Path, size_limit: int) -> list[str]:
    """Write malformed or hostile files; every one must be reported failed with a reason."""
    folder.mkdir(parents=True, exist_ok=True)
    good_pdf = make_pdf(["Some text for the truncated copy."])

    bomb = io.BytesIO()
    with zipfile.ZipFile(bomb, "w", zipfile.ZIP_DEFLATED) as z:
        z.writestr("word/document.xml", "<w:document/>")
        chunk = b"\0" * 2**20
        for i in range(210):
            z.writestr(f"word/media/zeros{i}.bin", chunk)
    not_word = io.BytesIO()
    with zipfile.ZipFile(not_word, "w") as z:
        z.writestr("hello.txt", "just a zip")
    damaged_word = io.BytesIO()
    with zipfile.ZipFile(damaged_word, "w") as z:
        z.writestr("[Content_Types].xml", "<Types/>")
        z.writestr("word/document.xml", "<<<not xml")

    from pypdf import PdfReader, PdfWriter

    writer = PdfWriter()
    for page in PdfReader(io.BytesIO(good_pdf)).pages:
        writer.add_page(page)
    writer.encrypt(user_password="secret", owner_password="owner", algorithm="RC4-128")
    encrypted = io.BytesIO()
    writer.write(encrypted)

    files: dict[str, bytes] = {
        "empty.txt": b"",
        "blank.md": b"   \n\n\t  \n",
        "binary.txt": bytes(range(256)) * 20,
        "image.txt": b"\x89PNG\r\n\x1a\n\0\0\0\rIHDR" + b"\0" * 200,
        "archive.md": gzip.compress(b"hello world" * 100),
        "program.rst": b"\x7fELF\x02\x01\x01\0" + b"\0" * 300,
        "controls.txt": bytes([1, 2, 3, 4, 5, 6, 7, 8, 14, 15, 16]) * 50,
        "bad-utf16.txt": b"\xff\xfe" + b"\x00\xd8" * 5 + b"a",
        "truncated.pdf": good_pdf[:300],
        "header-only.pdf": b"%PDF-1.7\n",
        "garbage.pdf": b"%PDF-1.4\n" + b"this is not a pdf body at all " * 20,
        "encrypted.pdf": encrypted.getvalue(),
        "blank.pdf": make_pdf([""]),
        "fake.pdf": b"I am only text pretending to be a PDF.",
        "fake.docx": b"plain text, not a zip archive",
        "not-word.docx": not_word.getvalue(),
        "zip.txt": not_word.getvalue(),
        "bomb.docx": bomb.getvalue(),
        "damaged.docx": damaged_word.getvalue(),
        "empty.docx": make_docx([]),
        "too-big.txt": b"words and more words\n" * (size_limit // 21 + 100),
        "empty-object.json": b"{}",
        "empty-list.json": b"[]",
        "numbers.json": b"[1, 2, 3, 4.5, null, true]",
        "no-messages.json": b'{"messages": []}',
        "null.json": b"null",
        "chatgpt-no-messages.json": json.dumps([{"title": "x", "mapping": {
            "r": {"message": None, "parent": None, "children": ["s"]},
            "s": {"parent": "r", "children": [], "message": {"author": {"role": "system"}, "content": {"parts": ["sys"]}}},
        }}]).encode(),
        "chatgpt-broken-nodes.json": json.dumps([{"mapping": {"a": "not a node", "b": 42}, "current_node": "a"}]).encode(),
        "chatgpt-cycle.json": json.dumps([{"mapping": {
            "a": {"parent": "b", "children": ["b"], "message": {"author": {"role": "tool"}, "content": {"parts": ["t"]}}},
            "b": {"parent": "a", "children": ["a"], "message": None}}, "current_node": "a"}]).encode(),
        "empty-messages.json": json.dumps([{"role": "user", "content": ""}, {"role": "assistant", "content": None}]).encode(),
        "empty-messages.jsonl": b'{"role": "user", "content": ""}\n{"role": "assistant", "content": "   "}\n',
        "script-only.html": b"<html><head><script>alert(1)</script></head><body>   </body></html>",
        "empty-personas.csv": b"user 1 personas,user 2 personas,Best Generated Conversation\n",
    }
    for name, data in files.items():
        (folder / name).write_bytes(data)
    return sorted(files)
