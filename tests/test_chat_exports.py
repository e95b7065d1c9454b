"""Chat apps' exports (ChatGPT, Claude, Telegram, WhatsApp), plain and zipped; zip archives of files
through the archive guards; Markdown front matter; structured data read as text says so; the
timestamp migration.

Every fixture is written here, in the shape each app exports (ids, uuids, account data, tool
calls and media included), about made-up people. Each chat test asserts the speakers, turns and
times, and the exact text the library keeps to train on: no JSON syntax, no uuids.
"""

from __future__ import annotations

import io
import json
import re
import zipfile
from pathlib import Path

import pytest

from engram_app.ingest import Library
from engram_app.ingest.detect import parse_bytes
from engram_app.ingest.limits import ParseLimits
from engram_app.store import open_db
from library_fixtures import make_docx

UUID = re.compile(r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}")
JSON_SYNTAX = re.compile(r'[{}\[\]]|":|\\n')

# --- ChatGPT ---------------------------------------------------------------------------------------


def gpt_node(node_id: str, parent: str | None, children: list[str], message: dict | None) -> dict:
    return {"id": node_id, "message": message, "parent": parent, "children": children}


def gpt_message(message_id: str, role: str, content: dict, create_time: float | None, recipient: str = "all",
                **metadata) -> dict:
    return {"id": message_id, "author": {"role": role, "name": None, "metadata": {}}, "create_time": create_time,
            "update_time": None, "content": content, "status": "finished_successfully", "end_turn": True,
            "weight": 1.0, "metadata": metadata, "recipient": recipient}


def gpt_text(*parts) -> dict:
    return {"content_type": "text", "parts": list(parts)}


CHATGPT = [
    {
        "title": "Moving to Porto",
        "create_time": 1704058860.0,
        "update_time": 1704059012.25,
        "conversation_id": "0d6f3e5c-2b1a-4f7e-9c3d-8a1b2c3d4e5f",
        "current_node": "7c1d2e3f-0000-4000-8000-00000000000a",
        "mapping": {
            "aaa1b2c3-0000-4000-8000-000000000001": gpt_node(
                "aaa1b2c3-0000-4000-8000-000000000001", None, ["5e0a1b2c-0000-4000-8000-000000000002"], None),
            "5e0a1b2c-0000-4000-8000-000000000002": gpt_node(
                "5e0a1b2c-0000-4000-8000-000000000002", "aaa1b2c3-0000-4000-8000-000000000001",
                ["1f2e3d4c-0000-4000-8000-000000000003"],
                gpt_message("5e0a1b2c-0000-4000-8000-000000000002", "system", gpt_text(""), None,
                            is_visually_hidden_from_conversation=True)),
            "1f2e3d4c-0000-4000-8000-000000000003": gpt_node(
                "1f2e3d4c-0000-4000-8000-000000000003", "5e0a1b2c-0000-4000-8000-000000000002",
                ["2a3b4c5d-0000-4000-8000-000000000004"],
                gpt_message("1f2e3d4c-0000-4000-8000-000000000003", "user",
                            gpt_text("I am moving to Porto in March with my cat Miso."), 1704058865.123,
                            request_id="8f1e2d3c4b5a6978-LIS")),
            "2a3b4c5d-0000-4000-8000-000000000004": gpt_node(  # the assistant calls the browser tool
                "2a3b4c5d-0000-4000-8000-000000000004", "1f2e3d4c-0000-4000-8000-000000000003",
                ["3b4c5d6e-0000-4000-8000-000000000005"],
                gpt_message("2a3b4c5d-0000-4000-8000-000000000004", "assistant",
                            {"content_type": "code", "language": "unknown",
                             "text": 'search("pet friendly flats Porto")'}, 1704058870.0, recipient="browser")),
            "3b4c5d6e-0000-4000-8000-000000000005": gpt_node(
                "3b4c5d6e-0000-4000-8000-000000000005", "2a3b4c5d-0000-4000-8000-000000000004",
                ["4c5d6e7f-0000-4000-8000-000000000006"],
                {**gpt_message("3b4c5d6e-0000-4000-8000-000000000005", "tool",
                               {"content_type": "tether_browsing_display", "result": "TOOL RESULT PAGE",
                                "summary": None}, 1704058880.0),
                 "author": {"role": "tool", "name": "browser", "metadata": {}}}),
            "4c5d6e7f-0000-4000-8000-000000000006": gpt_node(
                "4c5d6e7f-0000-4000-8000-000000000006", "3b4c5d6e-0000-4000-8000-000000000005",
                ["6b0c1d2e-0000-4000-8000-000000000009", "5d6e7f80-0000-4000-8000-000000000007"],
                gpt_message("4c5d6e7f-0000-4000-8000-000000000006", "assistant",
                            gpt_text("Bonfim and Campanh\u00e3 have many pet-friendly flats."), 1704058901.5)),
            "6b0c1d2e-0000-4000-8000-000000000009": gpt_node(  # a branch the user edited away
                "6b0c1d2e-0000-4000-8000-000000000009", "4c5d6e7f-0000-4000-8000-000000000006", [],
                gpt_message("6b0c1d2e-0000-4000-8000-000000000009", "user", gpt_text("ABANDONED question"),
                            1704058950.0)),
            "5d6e7f80-0000-4000-8000-000000000007": gpt_node(
                "5d6e7f80-0000-4000-8000-000000000007", "4c5d6e7f-0000-4000-8000-000000000006",
                ["7c1d2e3f-0000-4000-8000-00000000000a"],
                gpt_message("5d6e7f80-0000-4000-8000-000000000007", "user",
                            {"content_type": "multimodal_text", "parts": [
                                {"content_type": "image_asset_pointer",
                                 "asset_pointer": "file-service://file-3KjQxv2Lr8WmTnB5", "size_bytes": 182734,
                                 "width": 1024, "height": 768, "fovea": None, "metadata": None},
                                "Is this flat's balcony safe for a cat?"]}, 1704059000.0)),
            "7c1d2e3f-0000-4000-8000-00000000000a": gpt_node(
                "7c1d2e3f-0000-4000-8000-00000000000a", "5d6e7f80-0000-4000-8000-000000000007", [],
                gpt_message("7c1d2e3f-0000-4000-8000-00000000000a", "assistant",
                            gpt_text("Add a net to the balcony rail: cats slip through gaps wider than 5 cm."),
                            1704059012.25, model_slug="gpt-4o")),
        },
        "moderation_results": [],
        "plugin_ids": None,
        "id": "0d6f3e5c-2b1a-4f7e-9c3d-8a1b2c3d4e5f",
    },
    {
        "title": "Vet visit",
        "create_time": 1704100000.0,
        "current_node": "b2c3d4e5-0000-4000-8000-00000000000c",
        "mapping": {
            "a1b2c3d4-0000-4000-8000-00000000000b": gpt_node(
                "a1b2c3d4-0000-4000-8000-00000000000b", None, ["b2c3d4e5-0000-4000-8000-00000000000c"], None),
            "b2c3d4e5-0000-4000-8000-00000000000c": gpt_node(
                "b2c3d4e5-0000-4000-8000-00000000000c", "a1b2c3d4-0000-4000-8000-00000000000b", [],
                gpt_message("b2c3d4e5-0000-4000-8000-00000000000c", "user",
                            gpt_text("Miso is due for her vaccines in April."), None)),
        },
        "id": "9e8d7c6b-5a49-4838-a726-150f4e3d2c1b",
    },
]
CHATGPT_TURNS = [
    (0, "user", "I am moving to Porto in March with my cat Miso.", "2023-12-31T21:41:05Z"),
    (0, "assistant", "Bonfim and Campanh\u00e3 have many pet-friendly flats.", "2023-12-31T21:41:41Z"),
    (0, "user", "Is this flat's balcony safe for a cat?", "2023-12-31T21:43:20Z"),
    (0, "assistant", "Add a net to the balcony rail: cats slip through gaps wider than 5 cm.", "2023-12-31T21:43:32Z"),
    (1, "user", "Miso is due for her vaccines in April.", None),
]

# --- Claude ----------------------------------------------------------------------------------------

ACCOUNT = {"uuid": "4b8f2c1e-7d3a-4e9b-a1c5-2f6d8e0b3a71"}
CLAUDE = [
    {
        "uuid": "c1a2b3c4-d5e6-4f70-8192-a3b4c5d6e7f8",
        "name": "Sourdough starter",
        "created_at": "2024-03-14T09:20:41.118462Z",
        "updated_at": "2024-03-14T09:25:02.004211Z",
        "account": ACCOUNT,
        "chat_messages": [
            {"uuid": "d1e2f3a4-b5c6-4d7e-8f90-a1b2c3d4e5f6",
             "text": "My sourdough starter is called Bubbles and lives on top of the fridge.",
             "content": [{"start_timestamp": "2024-03-14T09:21:07.512345Z", "stop_timestamp": None, "type": "text",
                          "text": "My sourdough starter is called Bubbles and lives on top of the fridge.",
                          "citations": []}],
             "sender": "human", "created_at": "2024-03-14T09:21:07.512345Z",
             "updated_at": "2024-03-14T09:21:07.512345Z",
             "attachments": [{"file_name": "feeding-log.txt", "file_size": 312, "file_type": "txt",
                              "extracted_content": "Day 1: 50 g flour, 50 g water."}],
             "files": [{"file_name": "jar.jpg"}]},
            {"uuid": "e2f3a4b5-c6d7-4e8f-9a01-b2c3d4e5f6a7",
             "text": "Bubbles will be happier on the counter; feed it twice a day.",
             "content": [{"type": "thinking", "thinking": "SECRET REASONING about the starter", "summaries": []},
                         {"type": "text", "text": "Bubbles will be happier on the counter; feed it twice a day.",
                          "citations": []}],
             "sender": "assistant", "created_at": "2024-03-14T10:21:19.004211+01:00",
             "updated_at": "2024-03-14T10:21:19.004211+01:00", "attachments": [], "files": []},
            {"uuid": "f3a4b5c6-d7e8-4f90-a1b2-c3d4e5f6a7b8", "text": "How wet should it be?",
             "content": [{"type": "text", "text": "How wet should it be?"}],
             "sender": "human", "created_at": "2024-03-14T09:24:00Z", "attachments": [], "files": []},
            {"uuid": "a4b5c6d7-e8f9-4a01-b2c3-d4e5f6a7b8c9", "text": "",
             "content": [{"type": "tool_use", "name": "web_search", "input": {"query": "starter hydration"}},
                         {"type": "tool_result", "name": "web_search",
                          "content": [{"type": "text", "text": "TOOL OUTPUT"}]},
                         {"type": "text", "text": "Keep it at 100% hydration: equal weights of flour and water."}],
             "sender": "assistant", "created_at": "2024-03-14T09:25:02.004211Z", "attachments": [], "files": []},
        ],
    },
    {
        "uuid": "b5c6d7e8-f9a0-4b12-c3d4-e5f6a7b8c9d0",
        "name": "Commute",
        "created_at": "2024-04-02T07:14:00Z",
        "updated_at": "2024-04-02T07:16:00Z",
        "account": ACCOUNT,
        "chat_messages": [  # an older export: messages without content blocks
            {"uuid": "c6d7e8f9-a0b1-4c23-d4e5-f6a7b8c9d0e1", "text": "I ride to work on a blue Brompton.",
             "sender": "human", "created_at": "2024-04-02T07:15:00Z", "attachments": [], "files": []},
            {"uuid": "d7e8f9a0-b1c2-4d34-e5f6-a7b8c9d0e1f2", "text": "A folding bike suits a train commute.",
             "sender": "assistant", "created_at": "2024-04-02T07:15:09Z", "attachments": [], "files": []},
        ],
    },
]
CLAUDE_TURNS = [
    (0, "user", "My sourdough starter is called Bubbles and lives on top of the fridge.", "2024-03-14T09:21:07Z"),
    (0, "assistant", "Bubbles will be happier on the counter; feed it twice a day.", "2024-03-14T09:21:19Z"),
    (0, "user", "How wet should it be?", "2024-03-14T09:24:00Z"),
    (0, "assistant", "Keep it at 100% hydration: equal weights of flour and water.", "2024-03-14T09:25:02Z"),
    (1, "user", "I ride to work on a blue Brompton.", "2024-04-02T07:15:00Z"),
    (1, "assistant", "A folding bike suits a train commute.", "2024-04-02T07:15:09Z"),
]

# --- Telegram Desktop ------------------------------------------------------------------------------


def tg_message(message_id: int, stamp: str, unix: int, sender: str, sender_id: str, text, **extra) -> dict:
    entities = [{"type": "plain", "text": text}] if isinstance(text, str) and text else []
    return {"id": message_id, "type": "message", "date": stamp, "date_unixtime": str(unix), "from": sender,
            "from_id": sender_id, "text": text, "text_entities": entities, **extra}


TELEGRAM_CHAT = {
    "name": "Ana Costa",
    "type": "personal_chat",
    "id": 4815162342,
    "messages": [
        {"id": 100, "type": "service", "date": "2023-12-31T21:40:00", "date_unixtime": "1704058800",
         "actor": "Ana Costa", "actor_id": "user4815162342", "action": "phone_call", "duration_seconds": 42,
         "text": "", "text_entities": []},
        tg_message(101, "2023-12-31T21:41:05", 1704058865, "Ana Costa", "user4815162342",
                   "Did you book the train to Porto?"),
        tg_message(102, "2023-12-31T21:42:10", 1704058930, "Ben Silva", "user42",
                   ["Yes, the ", {"type": "bold", "text": "8:15"}, " from ",
                    {"type": "text_link", "text": "Santa Apol\u00f3nia", "href": "https://www.cp.pt"},
                    ", seats 41 and 42."]),
        tg_message(103, "2023-12-31T21:45:00", 1704059100, "Ana Costa", "user4815162342", "",
                   photo="photos/photo_1@31-12-2023_21-45-00.jpg", width=1280, height=960),
        tg_message(104, "2023-12-31T21:46:00", 1704059160, "Ana Costa", "user4815162342",
                   "Pixel is packed and ready.", photo="photos/photo_2@31-12-2023_21-46-00.jpg",
                   width=1280, height=960),
    ],
}
TELEGRAM_CHAT_TURNS = [
    (0, "Ana Costa", "Did you book the train to Porto?", "2023-12-31T21:41:05Z"),
    (0, "Ben Silva", "Yes, the 8:15 from Santa Apol\u00f3nia, seats 41 and 42.", "2023-12-31T21:42:10Z"),
    (0, "Ana Costa", "Pixel is packed and ready.", "2023-12-31T21:46:00Z"),
]
TELEGRAM_ACCOUNT = {
    "about": "Here is the data you requested. Remember: Telegram is ad free, it doesn't sell your data.",
    "personal_information": {"user_id": 42, "first_name": "Ben", "last_name": "Silva",
                             "phone_number": "+351 000 000 000", "username": "@bensilva_example", "bio": ""},
    "contacts": {"about": "This is your contact list.",
                 "list": [{"user_id": 4815162342, "first_name": "Ana", "last_name": "Costa",
                           "phone_number": "+351 000 000 001", "date": "2022-05-01T10:00:00"}]},
    "chats": {"about": "This page lists all chats from this export.", "list": [
        TELEGRAM_CHAT,
        {"name": "Climbing club", "type": "private_group", "id": 777000111, "messages": [
            {"id": 1, "type": "service", "date": "2024-01-05T18:00:00", "date_unixtime": "1704477600",
             "actor": "Rita", "actor_id": "user7", "action": "create_group", "title": "Climbing club",
             "members": ["Rita", "Ben Silva"], "text": "", "text_entities": []},
            tg_message(2, "2024-01-05T18:01:00", 1704477660, "Rita", "user7",
                       ["Wall opens at ", {"type": "italic", "text": "seven"}, " on Saturday"]),
            tg_message(3, "2024-01-05T18:02:00", 1704477720, "Ben Silva", "user42", "", file="files/route.pdf",
                       media_type="document"),
            {**tg_message(4, "2024-01-05T18:03:00", 1704477780, None, None, "I will bring the rope."),
             "from": None, "from_id": "user999"},
        ]},
    ]},
    "left_chats": {"about": "This page lists all supergroups and channels you left.", "list": []},
}
TELEGRAM_ACCOUNT_TURNS = TELEGRAM_CHAT_TURNS + [
    (1, "Rita", "Wall opens at seven on Saturday", "2024-01-05T18:01:00Z"),
    (1, "Deleted Account", "I will bring the rope.", "2024-01-05T18:03:00Z"),
]

# --- WhatsApp --------------------------------------------------------------------------------------

WHATSAPP_ANDROID = (
    "12/31/23, 9:40 PM - Messages and calls are end-to-end encrypted. No one outside of this chat, not even "
    "WhatsApp, can read or listen to them. Tap to learn more.\n"
    "12/31/23, 9:41 PM - Ana Costa: Are you coming to the fireworks at the river?\n"
    "12/31/23, 9:42\u202fPM - Ben Silva: Yes! I'll bring Pixel.\n"
    "He hides under the bench when it gets loud.\n"
    "12/31/23, 9:43 PM - Ana Costa: <Media omitted>\n"
    "12/31/23, 9:44 PM - Ana Costa: This message was deleted\n"
    "12/31/23, 9:45 PM - Ben Silva changed this group's icon\n"
    "12/31/23, 9:50 PM - Ana Costa: IMG-20231231-WA0003.jpg (file attached)\n"
    "Fireworks from our balcony\n"
    "1/1/24, 12:01 AM - Ben Silva: Happy new year! <This message was edited>\n"
)
WHATSAPP_ANDROID_TURNS = [
    (0, "Ana Costa", "Are you coming to the fireworks at the river?", "2023-12-31T21:41:00"),
    (0, "Ben Silva", "Yes! I'll bring Pixel.\nHe hides under the bench when it gets loud.", "2023-12-31T21:42:00"),
    (0, "Ana Costa", "Fireworks from our balcony", "2023-12-31T21:50:00"),
    (0, "Ben Silva", "Happy new year!", "2024-01-01T00:01:00"),
]
LRM = "\u200e"
WHATSAPP_IOS = (
    f"[31/12/2023, 21:40:00] Porto trip: {LRM}Messages and calls are end-to-end encrypted. No one outside of this "
    "chat, not even WhatsApp, can read or listen to them.\n"
    f"[31/12/2023, 21:40:00] Porto trip: {LRM}Ana Costa created group \u201cPorto trip\u201d\n"
    "[31/12/2023, 21:41:05] Ana Costa: Train leaves at 8:15 from Santa Apol\u00f3nia.\n"
    f"{LRM}[31/12/2023, 21:42:10] Ben Silva: {LRM}<attached: 00000012-PHOTO-2023-12-31-21-42-10.jpg>\n"
    "[31/12/2023, 21:43:00] Ben Silva: Seats 41 and 42.\n"
    "Coach 3.\n"
    f"[01/01/2024, 00:01:30] Ana Costa: {LRM}image omitted\n"
)
WHATSAPP_IOS_TURNS = [
    (0, "Ana Costa", "Train leaves at 8:15 from Santa Apol\u00f3nia.", "2023-12-31T21:41:05"),
    (0, "Ben Silva", "Seats 41 and 42.\nCoach 3.", "2023-12-31T21:43:00"),
]


def zipped(members: dict[str, bytes], compression: int = zipfile.ZIP_DEFLATED) -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", compression) as archive:
        for name, data in members.items():
            archive.writestr(name, data)
    return buffer.getvalue()


JPEG = b"\xff\xd8\xff\xe0\x00\x10JFIF\x00" + bytes(range(256)) * 4
OPUS = b"OggS\x00\x02" + bytes(range(256)) * 4


def export_files(folder: Path) -> None:
    """Every export, plain and zipped the way each app sends it."""
    folder.mkdir(parents=True, exist_ok=True)
    chatgpt = json.dumps(CHATGPT).encode()
    claude = json.dumps(CLAUDE).encode()
    files = {
        "conversations.json": chatgpt,
        "chatgpt-export.zip": zipped({
            "conversations.json": chatgpt,
            "chat.html": b"<html><body><h4>Moving to Porto</h4><pre>I am moving to Porto</pre></body></html>",
            "user.json": json.dumps({"id": "user-Xk29sLp0", "email": "ben@example.invalid",
                                     "chatgpt_plus_user": False}).encode(),
            "message_feedback.json": b"[]",
            "file-3KjQxv2Lr8WmTnB5-balcony.png": b"\x89PNG\r\n\x1a\n" + bytes(range(256)),
        }),
        "claude-conversations.json": claude,
        "claude-export.zip": zipped({
            "conversations.json": claude,
            "users.json": json.dumps([{"uuid": ACCOUNT["uuid"], "full_name": "Ben Silva",
                                       "email_address": "ben@example.invalid"}]).encode(),
            "projects.json": b"[]",
        }),
        "result.json": json.dumps(TELEGRAM_CHAT, ensure_ascii=False).encode(),
        "telegram-account.json": json.dumps(TELEGRAM_ACCOUNT, ensure_ascii=False).encode(),
        "WhatsApp Chat with Ana Costa.txt": WHATSAPP_ANDROID.encode(),
        "_chat.txt": WHATSAPP_IOS.encode(),
        "WhatsApp Chat - Porto trip.zip": zipped({
            "_chat.txt": WHATSAPP_IOS.encode(),
            "00000012-PHOTO-2023-12-31-21-42-10.jpg": JPEG,
            "00000013-AUDIO-2023-12-31-21-44-00.opus": OPUS,
        }),
        "inventory.json": json.dumps({"warehouse": "north", "items": [{"sku": "K-1", "note": "blue kettle"}]}).encode(),
        "prices.csv": b"item,price\nkettle,24.90\nteapot,18.50\n",
        "garden-plan.md": (b"---\ntitle: Garden plan for spring\ntags: [garden, spring]\ndate: 2024-03-01\n"
                           b"draft: false\n---\n# Beds\n\nPlant the tomatoes in May, after the last frost.\n"),
    }
    for name, data in files.items():
        (folder / name).write_bytes(data)


@pytest.fixture(scope="module")
def imported(tmp_path_factory, tokenizer, embedder):
    """One library that imported every export at once (one import: one parser process)."""
    folder = tmp_path_factory.mktemp("exports")
    export_files(folder)
    home = tmp_path_factory.mktemp("home")
    library = Library(open_db(home), home, tokenizer, embedder)
    results = {Path(r.path).name: r for r in library.ingest([folder])}
    return library, results


def turns(library: Library, source: int) -> list[tuple]:
    return [(r["conversation"], r["speaker"], r["text"], r["timestamp"])
            for r in library.show(source)["records_list"]]


def training_text(library: Library, source: int) -> str:
    return "\n".join(c["text"] for c in library.show(source)["chunks_list"])


def assert_chat(library: Library, result, fmt: str, expected: list[tuple], title: str) -> None:
    """The source holds exactly these turns, and its chunks exactly their "speaker: text" lines."""
    assert (result.status, result.kind, result.format, result.title) == ("added", "chat", fmt, title), result.reason
    assert turns(library, result.source) == expected
    text = training_text(library, result.source)
    assert text == "\n".join(f"{speaker}: {words}" for _, speaker, words, _ in expected)
    assert not UUID.search(text) and not JSON_SYNTAX.search(text)


@pytest.mark.parametrize("name", ["conversations.json", "chatgpt-export.zip"])
def test_a_chatgpt_export_plain_or_zipped_keeps_the_words_people_wrote_with_their_times(imported, name):
    library, results = imported
    assert_chat(library, results[name], "chatgpt", CHATGPT_TURNS, "ChatGPT export: 2 conversations")


def test_the_zipped_chatgpt_export_names_the_files_it_did_not_import(imported):
    result = imported[1]["chatgpt-export.zip"]
    assert result.warnings == [
        "4 other files of the export not imported (account data, the HTML copy of the chats, images, audio): "
        "chat.html, user.json, message_feedback.json, file-3KjQxv2Lr8WmTnB5-balcony.png"]
    assert imported[1]["conversations.json"].warnings == []


@pytest.mark.parametrize("name", ["claude-conversations.json", "claude-export.zip"])
def test_a_claude_export_plain_or_zipped_gives_its_turns_without_thinking_or_tool_calls(imported, name):
    library, results = imported
    assert_chat(library, results[name], "claude", CLAUDE_TURNS, "Claude export: 2 conversations")
    assert "SECRET" not in training_text(library, results[name].source)
    assert results[name].warnings[0] == ("2 files attached to messages not imported (only the messages' text is): "
                                         "import them on their own if they should be remembered")


def test_a_telegram_chat_flattens_formatted_text_and_skips_service_and_media_only_messages(imported):
    library, results = imported
    assert_chat(library, results["result.json"], "telegram", TELEGRAM_CHAT_TURNS, "Telegram: Ana Costa")
    assert results["result.json"].warnings == [
        "1 message with a photo, file, sticker or voice note and no text not imported (only text is kept)"]


def test_a_whole_telegram_account_gives_every_chat_and_none_of_the_account_data(imported):
    library, results = imported
    assert_chat(library, results["telegram-account.json"], "telegram", TELEGRAM_ACCOUNT_TURNS,
                "Telegram export: 2 chats")
    text = training_text(library, results["telegram-account.json"].source)
    assert "+351" not in text and "contact list" not in text


def test_an_android_whatsapp_chat_keeps_multi_line_messages_and_captions_and_skips_system_lines(imported):
    library, results = imported
    result = results["WhatsApp Chat with Ana Costa.txt"]
    assert_chat(library, result, "whatsapp", WHATSAPP_ANDROID_TURNS, "WhatsApp Chat with Ana Costa")
    assert result.warnings == ["2 media messages of the chat (photos, voice notes, videos, documents) not imported: "
                               "only text is kept, with a photo's caption"]


def test_an_iphone_whatsapp_chat_reads_its_bracketed_stamps_and_skips_marked_system_lines(imported):
    library, results = imported
    assert_chat(library, results["_chat.txt"], "whatsapp", WHATSAPP_IOS_TURNS, "WhatsApp: Ana Costa, Ben Silva")


def test_a_zipped_whatsapp_chat_is_one_chat_with_its_media_skipped_and_named(imported):
    library, results = imported
    result = results["WhatsApp Chat - Porto trip.zip"]
    assert_chat(library, result, "whatsapp", WHATSAPP_IOS_TURNS, "WhatsApp: Ana Costa, Ben Silva")
    assert result.warnings == [
        "2 media messages of the chat (photos, voice notes, videos, documents) not imported: only text is kept, "
        "with a photo's caption",
        "2 media files in the archive not imported (only the chat's text is): "
        "00000012-PHOTO-2023-12-31-21-42-10.jpg, 00000013-AUDIO-2023-12-31-21-44-00.opus"]
    assert library.show(result.source)["filename"] == "WhatsApp Chat - Porto trip.zip"


def test_whatsapp_dates_that_fit_both_orders_are_read_by_the_clock_and_said_so():
    day_first = "01/02/2024, 21:41 - Ana: Snow today\n03/02/2024, 08:00 - Ben: Still snowing\n"
    parsed = parse_bytes(day_first.encode(), "chat.txt")
    assert [r.timestamp for r in parsed.records] == ["2024-02-01T21:41:00", "2024-02-03T08:00:00"]
    assert parsed.warnings == ["every date in the chat fits both day/month and month/day; they were read as "
                               "day/month/year, the way a phone set to a 24-hour clock writes them"]
    month_first = "01/02/24, 9:41 PM - Ana: Snow today\n01/03/24, 8:00 AM - Ben: Still snowing\n"
    parsed = parse_bytes(month_first.encode(), "chat.txt")
    assert [r.timestamp for r in parsed.records] == ["2024-01-02T21:41:00", "2024-01-03T08:00:00"]
    assert "month/day/year" in parsed.warnings[0]


@pytest.mark.parametrize("name, fmt, warning", [
    ("inventory.json", "json-text", "read as plain text: this JSON is no chat export, message list or profile the "
                                    "library knows (docs/LIBRARY.md lists them), so its keys, quotes and brackets "
                                    "become training text as they are"),
    ("prices.csv", "csv-text", "read as plain text: this CSV is not the persona format, so its header, commas and "
                               "quotes become training text as they are"),
])
def test_json_or_csv_of_no_known_shape_is_read_as_text_with_a_warning(imported, name, fmt, warning):
    result = imported[1][name]
    assert (result.status, result.kind, result.format, result.warnings) == ("added", "document", fmt, [warning])
    assert result.to_json()["warnings"] == [warning]


def test_markdown_front_matter_is_metadata_its_title_the_title_and_none_of_it_text(imported):
    library, results = imported
    result = results["garden-plan.md"]
    assert (result.status, result.format, result.title) == ("added", "markdown", "Garden plan for spring")
    [record] = library.show(result.source)["records_list"]
    assert record["text"] == "# Beds\n\nPlant the tomatoes in May, after the last frost."
    assert result.warnings == []


def test_a_markdown_file_opening_with_a_rule_keeps_it_as_text():
    parsed = parse_bytes(b"---\nJust a line under a rule.\n\nMore text.\n", "note.md")
    assert parsed.records[0].text == "---\nJust a line under a rule.\n\nMore text."


def test_the_import_result_keeps_its_keys_and_adds_warnings(imported):
    assert list(imported[1]["prices.csv"].to_json()) == [
        "path", "status", "reason", "source", "kind", "format", "title", "records", "chunks", "warnings"]


# --- zip archives of files ---------------------------------------------------------------------------


def test_each_file_of_a_zip_archive_becomes_a_source_of_its_own(tmp_path, tokenizer, embedder):
    home = tmp_path / "home"
    library = Library(open_db(home), home, tokenizer, embedder)
    archive = tmp_path / "notes.zip"
    archive.write_bytes(zipped({
        "notes/": b"",
        "notes/monday.md": b"---\ntitle: Monday\n---\nThe heron came back to the pond.\n",
        "notes/tuesday.txt": b"Pixel barked at the heron all morning.\n",
        "notes/letter.docx": make_docx(["Dear Ana,", "The boat trip moves to Friday."], title="Letter to Ana"),
        "notes/.DS_Store": b"\0\0\0\1Bud1",
        "__MACOSX/notes/._monday.md": b"\0\5\26\7",
    }))
    results = library.ingest([archive])
    assert [(Path(r.path).relative_to(tmp_path).as_posix(), r.status, r.format, r.title) for r in results] == [
        ("notes.zip/notes/monday.md", "added", "markdown", "Monday"),
        ("notes.zip/notes/tuesday.txt", "added", "txt", "Pixel barked at the heron all morning."),
        ("notes.zip/notes/letter.docx", "added", "docx", "Letter to Ana"),
    ]
    assert [s["filename"] for s in library.sources()] == [
        "notes.zip/notes/monday.md", "notes.zip/notes/tuesday.txt", "notes.zip/notes/letter.docx"]
    # Each member's bytes are kept as the original of its source.
    with zipfile.ZipFile(archive) as z:
        assert (home / "uploads" / library.show(results[1].source)["sha256"]).read_bytes() == \
            z.read("notes/tuesday.txt")


def test_a_zip_with_hostile_members_refuses_each_with_its_reason_while_the_others_import(
        tmp_path, tokenizer, embedder):
    home = tmp_path / "home"
    limits = ParseLimits(archive_members=6, archive_depth=2)
    library = Library(open_db(home), home, tokenizer, embedder, limits=limits)
    crowded = zipped({f"crowd/{i}.txt": f"Note {i}".encode() for i in range(7)})
    deepest = zipped({"level3.txt": b"Three archives down."})
    deep = zipped({"deep/ok.txt": b"One archive inside another is read.", "deep/level2.zip": deepest})
    hostile = tmp_path / "hostile.zip"
    hostile.write_bytes(zipped({
        "good.txt": b"The heron came back to the pond.",
        "../escape.txt": b"I would land outside the archive.",
        "/etc/cron.d/escape": b"* * * * * root true",
        "zeros.txt": b"a" * (3 * 2**20),
        "crowded.zip": crowded,
        "deep.zip": deep,
    }))
    with zipfile.ZipFile(hostile) as z:
        ratio = z.getinfo("zeros.txt").file_size / z.getinfo("zeros.txt").compress_size
    results = {r.path.removeprefix(f"{tmp_path}/"): (r.status, r.reason) for r in library.ingest([hostile])}
    assert results == {
        "hostile.zip/good.txt": ("added", None),
        "hostile.zip/../escape.txt": ("failed", "its name '../escape.txt' climbs out of the archive with '..' (path "
                                                "traversal): refused"),
        "hostile.zip//etc/cron.d/escape": ("failed", "its name is an absolute path ('/etc/cron.d/escape'), which would "
                                                    "leave the archive: refused"),
        "hostile.zip/zeros.txt": ("failed", f"it unpacks to {ratio:,.0f} times its packed size (more than 200 "
                                            "times): refused as a possible zip bomb"),
        "hostile.zip/crowded.zip": ("failed", "the zip archive holds more than 6 files (it declares 7), the most read "
                                              "from one archive: unzip it and import its folders one by one"),
        "hostile.zip/deep.zip/deep/ok.txt": ("added", None),
        "hostile.zip/deep.zip/deep/level2.zip": ("failed", "a zip archive inside 2 others: archives are opened 2 "
                                                           "levels deep at most; unzip it and import its files"),
    }
    ready = {s["filename"] for s in library.sources()}
    assert ready == {"hostile.zip/good.txt", "hostile.zip/deep.zip/deep/ok.txt"}
    failed = {s["filename"]: s["error"] for s in library.sources(status="failed")}
    assert failed == {name: reason for name, (status, reason) in results.items() if status == "failed"}
    assert library.db.execute("select count(*) from records").fetchone()[0] == 2
    assert sorted(p.name for p in (home / "uploads").iterdir()) == sorted(
        library.show(s["id"])["sha256"] for s in library.sources())


def test_an_archive_declaring_more_files_than_the_limit_is_refused_before_its_directory_is_read(
        tmp_path, tokenizer, embedder):
    home = tmp_path / "home"
    library = Library(open_db(home), home, tokenizer, embedder, limits=ParseLimits(archive_members=3))
    archive = tmp_path / "many.zip"
    archive.write_bytes(zipped({f"{i}.txt": b"x" for i in range(4)}))
    [result] = library.ingest([archive])
    assert (result.status, result.reason) == (
        "failed", "the zip archive holds more than 3 files (it declares 4), the most read from one archive: unzip it "
                  "and import its folders one by one")


# --- the timestamp column ----------------------------------------------------------------------------


def test_the_timestamp_migration_carries_an_existing_database_over(tmp_path, monkeypatch, tokenizer, embedder):
    import engram_app.store.migrations as migrations

    with monkeypatch.context() as patch:  # the database as the previous version left it, with a chat in it
        patch.setattr("engram_app.store.db.migrate",
                      lambda db: migrations.migrate(db, stop_before="m006_record_timestamps"))
        db = open_db(tmp_path)
    assert "timestamp" not in db["records"].columns_dict
    db["collections"].insert({"id": 1, "name": "default", "created": "2024-01-01T00:00:00Z"})
    db["sources"].insert({"id": 1, "collection_id": 1, "kind": "chat", "format": "transcript", "title": "Old chat",
                          "filename": "old.txt", "sha256": "0" * 64, "size": 10, "status": "ready", "records": 1,
                          "chunks": 0, "tokens": 0, "created": "2024-01-01T00:00:00Z"})
    db["records"].insert({"source_id": 1, "position": 0, "kind": "turn", "conversation": 0, "speaker": "Ana",
                          "person": None, "text": "An old message."})
    before = list(db.query("select * from records"))

    assert "m006_record_timestamps" in migrations.migrate(db)

    assert list(db.query("select * from records")) == [{**row, "timestamp": None} for row in before]
    assert migrations.migrate(db) == []
    library = Library(db, tmp_path, tokenizer, embedder)
    chat = tmp_path / "chat.txt"
    chat.write_text("[31/12/2023, 21:41:05] Ana: A new message.\n[31/12/2023, 21:42:00] Ben: Noted.\n")
    [result] = library.ingest([chat])
    assert [r[3] for r in turns(library, result.source)] == ["2023-12-31T21:41:05", "2023-12-31T21:42:00"]


def test_the_timestamp_migration_leaves_a_records_table_that_has_the_column(tmp_path):
    import engram_app.store.migrations as migrations

    db = open_db(tmp_path)
    db.execute("delete from _sqlite_migrations where name = 'm006_record_timestamps'")
    assert migrations.migrate(db) == ["m006_record_timestamps"]
    assert list(db["records"].columns_dict).count("timestamp") == 1
