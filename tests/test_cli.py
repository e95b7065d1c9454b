import json

from click.testing import CliRunner

from engram_app.cli import cli


def test_help_lists_the_commands():
    result = CliRunner().invoke(cli, ["--help"])
    assert result.exit_code == 0
    for command in ("chat", "serve", "prepare"):
        assert command in result.output


def test_chat_json_has_reply_and_tokens(tiny_model_dir, tmp_path):
    result = CliRunner().invoke(
        cli, ["chat", "--home", str(tmp_path), "--model", str(tiny_model_dir), "--max-tokens", "10", "--json", "hello"]
    )
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    assert set(data) >= {"reply", "tokens", "ids"}
    assert data["ids"][-len(data["tokens"]):] == [t["id"] for t in data["tokens"]]  # the prompt, then the reply
    assert 0 < len(data["tokens"]) <= 10
    assert all(set(t) >= {"text", "id"} and isinstance(t["id"], int) for t in data["tokens"])
    assert all(t["memory"] == [] for t in data["tokens"])  # no memory pack: nothing fired
    assert all(isinstance(t["text"], str) for t in data["tokens"])
    assert isinstance(data["reply"], str)


def test_chat_plain_text_prints_the_same_reply_as_json(tiny_model_dir, tmp_path):
    args = ["chat", "--home", str(tmp_path), "--model", str(tiny_model_dir), "--max-tokens", "8", "hello"]
    plain = CliRunner().invoke(cli, args)
    as_json = CliRunner().invoke(cli, [*args, "--json"])
    assert plain.exit_code == 0, plain.output
    reply = json.loads(as_json.stdout)["reply"]
    assert plain.stdout == reply.rstrip("\ufffd") + "\n"


def test_unknown_model_is_one_clear_line_not_a_traceback(tmp_path):
    result = CliRunner().invoke(cli, ["chat", "--home", str(tmp_path), "--model", str(tmp_path / "missing"), "hi"])
    assert result.exit_code == 1
    assert "Error: Model" in result.output and "not found" in result.output
    assert "Traceback" not in result.output
