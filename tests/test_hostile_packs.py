"""Pack import refuses what it cannot vouch for, and leaves the data root as it found it.

Each hostile pack file is crafted from an honest export (the tiny model, packs trained a few
steps) with one thing changed; each test asserts the exact outcome (refused with its reason, or
imported within bounds) and that nothing else in the data root changed (files and pack rows).
"""

from __future__ import annotations

import hashlib
import json
import resource
import threading
import time
import zipfile
import zlib
from collections.abc import Callable
from pathlib import Path

import pytest
from click.testing import CliRunner

from engram_app.cli import cli
from engram_app.engram import EngramConfig
from engram_app.engram.hashing import is_prime, next_prime
from engram_app.errors import EngramError
from engram_app.inference import GenerationOptions
from engram_app.service import Service
from engram_app.settings import Settings
from engram_app.training import transfer
from engram_app.training.packs import PackConfig
from engram_app.training.sizes import PRESETS
from test_training import PROFILE_A, add_profile, run_inline, stop_worker

SHORT = GenerationOptions(max_new_tokens=6)
QUESTION = "What is my dog called?"
DB_FILES = {"engram.db", "engram.db-wal", "engram.db-shm"}


# --- fixtures: honest exports, and a fresh data root to import them into -------------------------

@pytest.fixture(scope="module")
def exports(tmp_path_factory, tiny_model_dir):
    """A library whose packs were trained a few steps and exported: engram, engram+lora, mapped."""
    tmp = tmp_path_factory.mktemp("exports")
    source = Service(Settings(home=tmp / "home", model=str(tiny_model_dir), device="cpu"))
    add_profile(source, tmp, "a.md", PROFILE_A)
    source.create_pack("me", size="small")
    run_inline(source, "me", max_steps=5, lr=3e-3)  # evaluated: its probes ask about the user
    source.create_pack("duo", size="small", mode="engram+lora")
    run_inline(source, "duo", max_steps=5, lr=3e-3, evaluate=False)
    mapped = EngramConfig(rows_per_head=1009, head_dim=8, storage="mapped")  # xlarge-style, tiny sizes
    source.packs_store().create("mapped", str(tiny_model_dir), size="xlarge",
                                config=PackConfig(preset="xlarge", engram=mapped.to_dict()))
    run_inline(source, "mapped", max_steps=5, lr=3e-3, evaluate=False)
    skipping = PRESETS["small"].engram_config()
    skipping.skip_template = True  # n-grams past the chat template: the import must keep the addressing
    source.packs_store().create("skip", str(tiny_model_dir), size="small",
                                config=PackConfig(preset="small", engram=skipping.to_dict()))
    run_inline(source, "skip", max_steps=5, lr=3e-3, evaluate=False)
    files = {name: source.export_pack(name, tmp / f"{name}.zip") for name in ("me", "duo", "mapped", "skip")}
    yield source, files
    stop_worker(source.settings.home)


@pytest.fixture
def target(tmp_path, tiny_model_dir):
    """Another user's data root, with the same base model and a pack of their own."""
    service = Service(Settings(home=tmp_path / "home", model=str(tiny_model_dir), device="cpu"))
    service.create_pack("mine", size="small")
    (service.settings.home / "notes.txt").write_text("the user's own file")
    yield service
    stop_worker(service.settings.home)


def snapshot(service: Service) -> dict:
    """Every file and folder under the data root (with a hash of each file), and the pack rows."""
    home = service.settings.home
    files = {str(p.relative_to(home)): "dir" if p.is_dir() else hashlib.sha256(p.read_bytes()).hexdigest()
             for p in sorted(home.rglob("*")) if p.name not in DB_FILES}
    rows = {table: list(service.db().query(f"select * from {table} order by id"))
            for table in ("packs", "pack_versions", "jobs")}
    return {"files": files, "rows": rows}


def refused(service: Service, path: Path, match: str, name: str | None = "evil") -> str:
    """Import ``path``: it must be refused with ``match`` in the reason, and change nothing."""
    before = snapshot(service)
    with pytest.raises(EngramError, match=match) as caught:
        service.import_pack(path, name)
    assert snapshot(service) == before
    return str(caught.value)


def members(path: Path) -> dict[str, bytes]:
    with zipfile.ZipFile(path) as archive:
        return {name: archive.read(name) for name in archive.namelist()}


def craft(source: Path, target: Path, manifest: Callable[[dict], None] | None = None,
          adapter: Callable[[dict], None] | None = None, table: Callable[[dict], None] | None = None,
          replace: dict[str, bytes | None] | None = None) -> Path:
    """A copy of the pack file ``source`` with its JSON members edited and members replaced/added/dropped."""
    contents = members(source)
    for member, edit in (("pack.json", manifest), ("adapter/adapter_config.json", adapter),
                         ("adapter/table/table.json", table)):
        if edit is not None:
            data = json.loads(contents[member])
            edit(data)
            contents[member] = json.dumps(data).encode()
    for member, data in (replace or {}).items():
        if data is None:
            contents.pop(member, None)
        else:
            contents[member] = data
    with zipfile.ZipFile(target, "w", compression=zipfile.ZIP_DEFLATED) as archive:
        for member, data in contents.items():
            archive.writestr(member, data)
    return target


def memory_fields(adapter_config: dict) -> dict:
    """The memory's settings inside an adapter_config.json (nested in format 1, flat in the PEFT layout)."""
    return adapter_config["engram"] if "engram" in adapter_config else adapter_config


def set_memory(**values) -> tuple[Callable[[dict], None], Callable[[dict], None]]:
    """Edits that set memory fields in both pack.json and the adapter config (so they agree)."""
    return (lambda m: m["config"]["engram"].update(values)), (lambda a: memory_fields(a).update(values))


def deflated_zeros(size: int) -> tuple[bytes, int]:
    """A raw deflate stream of ``size`` zero bytes (a multiple of 1 MiB) and their CRC, without
    compressing them all: one fully flushed block repeated (each starts afresh)."""
    block = 1 << 20
    compressor = zlib.compressobj(9, zlib.DEFLATED, -15)
    piece = compressor.compress(bytes(block)) + compressor.flush(zlib.Z_FULL_FLUSH)
    tail = compressor.flush(zlib.Z_FINISH)
    crc, zeros = 0, bytes(block)
    for _ in range(size // block):
        crc = zlib.crc32(zeros, crc)
    return piece * (size // block) + tail, crc


def add_bomb(path: Path, member: str, size: int, declared: int | None = None) -> None:
    """Append ``member``: ``size`` zero bytes deflated to a few KB, declaring ``declared`` bytes."""
    data, crc = deflated_zeros(size)
    with zipfile.ZipFile(path, "a") as archive:
        archive.writestr(zipfile.ZipInfo(member), data)  # the compressed bytes, as they are
        info = archive.getinfo(member)
        info.compress_type, info.file_size, info.CRC = zipfile.ZIP_DEFLATED, declared or size, crc


def pack_folders(service: Service) -> list[str]:
    root = service.settings.home / "packs"
    return sorted(str(p.relative_to(root)) for p in root.rglob("*") if p.is_dir() and p.parent == root)


# --- what still works --------------------------------------------------------------------------------

@pytest.mark.parametrize("pack", ["me", "duo", "skip"])
def test_an_exported_pack_imports_into_another_data_root_and_answers_the_same(exports, target, pack):
    source, files = exports
    info = target.import_pack(files[pack], "copy")
    assert info["active_version"] == 1 and info["mode"] == source.pack(pack)["mode"]
    assert info["base_model"] == target.settings.model  # the user's own copy of the base model
    original = source.chat(QUESTION, options=SHORT, pack=pack, save=False)
    copy = target.chat(QUESTION, options=SHORT, pack="copy", save=False)
    assert copy.reply == original.reply
    assert [t.to_json() for t in copy.traces] == [t.to_json() for t in original.traces]
    assert sorted(members(files[pack])) == sorted(transfer.members_for(target.packs_store().config(
        target.packs_store().row("copy"))))
    assert pack_folders(target) == ["copy"]  # ("mine" has no version, so no folder)
    assert sorted(p.name for p in (target.settings.home / "packs" / "copy").iterdir()) == ["v1"]


def test_the_cli_exports_and_imports_with_the_same_json_shape_as_before(exports, target):
    source, _ = exports
    runner = CliRunner()
    out_file = target.settings.home.parent / "cli.zip"
    common = ["--home", str(source.settings.home), "--model", source.settings.model]
    out = runner.invoke(cli, ["pack", "export", *common, "me", "-o", str(out_file)])
    assert out.exit_code == 0 and out.stdout.strip() == str(out_file), out.output
    common = ["--home", str(target.settings.home), "--model", target.settings.model]
    out = runner.invoke(cli, ["pack", "import", *common, str(out_file), "--name", "cli", "--json"])
    assert out.exit_code == 0, out.output
    imported = json.loads(out.stdout)
    assert set(imported) == set(target.pack("mine")) and imported["name"] == "cli" and imported["active_version"] == 1
    out = runner.invoke(cli, ["pack", "import", *common, str(out_file), "--name", "cli"])
    assert out.exit_code == 1 and "exists already" in out.output and "Traceback" not in out.output


def test_a_self_contained_mapped_table_pack_imports_and_answers_the_same(exports, target):
    source, files = exports
    table = json.loads(members(files["mapped"])["adapter/table/table.json"])
    assert table["base"] is None and table["delta"] is False and table["count"] > 0
    info = target.import_pack(files["mapped"], "copy")
    assert info["storage"] == "mapped" and info["preset"] == "xlarge"
    assert target.chat(QUESTION, options=SHORT, pack="copy", save=False).reply == \
        source.chat(QUESTION, options=SHORT, pack="mapped", save=False).reply


def test_an_export_carries_no_probe_text_no_path_and_no_source_title(exports, tiny_model_dir):
    source, files = exports
    stored = source.pack("me")["versions"][0]["evaluation"]
    assert stored["recall"]["examples"][0]["prompt"] == QUESTION  # what the version keeps at home
    everything = b"".join(members(files["me"]).values()) + b"".join(members(files["duo"]).values())
    for private in (QUESTION, "Where do I live", "Pixel", "Porto", "About me", "a.md", str(tiny_model_dir),
                    str(source.settings.home), "README"):
        assert private.encode() not in everything, private
    manifest = json.loads(members(files["me"])["pack.json"])
    assert manifest["base_model"] == "tiny-llama"  # named, not located
    assert manifest["evaluation"]["recall"] == {k: v for k, v in stored["recall"].items() if k != "examples"}
    assert manifest["evaluation"]["memorisation"] == stored["memorisation"]
    lora = json.loads(members(files["duo"])["adapter/lora/adapter_config.json"])
    assert lora["base_model_name_or_path"] is None


# --- the config and its bounds --------------------------------------------------------------------------

def test_an_enormous_rows_per_head_is_refused_at_once_without_a_prime_search(exports, target, tmp_path):
    _, files = exports
    manifest, adapter = set_memory(rows_per_head=10**30)
    path = craft(files["me"], tmp_path / "huge.zip", manifest, adapter)
    started = time.perf_counter()
    message = refused(target, path, "rows_per_head")
    assert time.perf_counter() - started < 5
    assert "small size allows (2..4093)" in message


def test_a_merely_large_rows_per_head_is_refused_before_any_table_is_allocated(exports, target, tmp_path):
    _, files = exports
    manifest, adapter = set_memory(rows_per_head=2_000_000)  # 4 GB of table for a small pack
    path = craft(files["me"], tmp_path / "large.zip", manifest, adapter)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    refused(target, path, r"rows_per_head \(2000000\) is outside")
    assert resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - peak < 200 * 1024  # KiB: no table was built


@pytest.mark.parametrize("values, reason", [
    ({"heads": 9}, r"heads \(9\) is outside what the small size allows \(1..8\)"),
    ({"head_dim": 64}, r"head_dim \(64\) is outside"),
    ({"layers": [0, 1]}, r"table \(130,976 rows\) is larger than the small size's \(65,488\)"),
    ({"layers": [0, 1, 2]}, r"layers \(\[0, 1, 2\]\) must be 1 to 2"),
    ({"storage": "mapped"}, r"storage \('mapped'\) is not the small size's"),
    ({"orders": [2, 3, 4]}, r"orders \(\[2, 3, 4\]\) must be"),
    ({"kernel_size": 4096}, r"kernel_size \(4096\) is outside"),
    ({"rows_per_head": "4093"}, r"rows_per_head \('4093'\) is outside"),
    ({"init_std": float("nan")}, r"init_std \(nan\) is outside"),
    ({"seed": -1}, r"seed \(-1\) is outside"),
    ({"surprise": 1}, r"unknown memory config fields \['surprise'\]"),
    ({"skip_template": "yes"}, r"skip_template \('yes'\) must be true or false"),
    ({"depth": 1.5}, r"depth \(1.5\) must be a fraction in \[0, 1\)"),
    ({"depth": "middle"}, r"depth \('middle'\) must be a fraction"),
    ({"skip_template": True, "template_ids": [1, -3]}, r"template_ids \(\[1, -3\]\) must be up to 1024 token ids"),
])
def test_memory_dimensions_outside_the_size_preset_are_refused_with_the_field_named(exports, target, tmp_path,
                                                                                      values, reason):
    _, files = exports
    manifest, adapter = set_memory(**values)
    refused(target, craft(files["me"], tmp_path / "bounds.zip", manifest, adapter), reason)


def test_a_lora_rank_or_preset_outside_the_known_ones_is_refused(exports, target, tmp_path):
    _, files = exports
    rank = craft(files["duo"], tmp_path / "rank.zip", lambda m: m["config"].update(lora_r=100_000))
    refused(target, rank, r"LoRA rank 100000 is outside 1..64")
    preset = craft(files["me"], tmp_path / "preset.zip", lambda m: m["config"].update(preset="gigantic"))
    refused(target, preset, r"does not describe a pack \(preset, mode\)")
    targets = craft(files["duo"], tmp_path / "targets.zip", replace={
        "adapter/lora/adapter_config.json": json.dumps({
            **json.loads(members(files["duo"])["adapter/lora/adapter_config.json"]),
            "modules_to_save": ["embed_tokens"]}).encode()})
    refused(target, targets, "sets modules_to_save")


def test_an_adapter_config_that_differs_from_the_manifest_is_refused(exports, target, tmp_path):
    _, files = exports
    path = craft(files["me"], tmp_path / "differs.zip", adapter=lambda a: memory_fields(a).update(rows_per_head=2003))
    refused(target, path, r"memory config differs from pack.json \(rows_per_head\)")


# --- members ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("extra, reason", [
    ({"adapter/README.md": b"# hello"}, "holds files a pack never has: adapter/README.md"),
    ({"adapter/lora/README.md": b"# hello"}, "holds files a pack never has: adapter/lora/README.md"),
    ({"adapter/notes.json": b"{}"}, "holds files a pack never has: adapter/notes.json"),
    ({"../../evil.json": b"{}"}, "holds files a pack never has: ../../evil.json"),
    ({"adapter/": b""}, "holds files a pack never has: adapter/"),
    ({"adapter/lora/adapter_config.json": b"{}"}, "files a engram pack of the small size never has: adapter/lora"),
    ({"adapter/adapter_model.safetensors": None}, "incomplete: adapter/adapter_model.safetensors missing"),
])
def test_members_the_format_does_not_need_are_refused(exports, target, tmp_path, extra, reason):
    _, files = exports
    refused(target, craft(files["me"], tmp_path / "extra.zip", replace=extra), reason)


def test_a_member_twice_is_refused(exports, target, tmp_path):
    _, files = exports
    path = craft(files["me"], tmp_path / "twice.zip")
    with zipfile.ZipFile(path, "a") as archive, pytest.warns(UserWarning, match="Duplicate name"):
        archive.writestr("adapter/adapter_config.json", b"{}")
    refused(target, path, "adapter/adapter_config.json more than once")


def test_a_deflated_gigabyte_readme_is_refused_without_writing_it(exports, target, tmp_path):
    _, files = exports
    path = craft(files["me"], tmp_path / "readme.zip")
    honest = path.stat().st_size
    add_bomb(path, "adapter/README.md", 1 << 30)
    assert path.stat().st_size - honest < 2 * 1024**2  # 1 GiB in about 1 MB
    started = time.perf_counter()
    refused(target, path, "holds files a pack never has: adapter/README.md")
    assert time.perf_counter() - started < 5


def test_weights_larger_than_their_config_implies_are_refused_whatever_the_header_says(exports, target, tmp_path):
    _, files = exports
    honest = members(files["me"])["adapter/adapter_model.safetensors"]
    padded = craft(files["me"], tmp_path / "padded.zip", replace={"adapter/adapter_model.safetensors": None})
    add_bomb(padded, "adapter/adapter_model.safetensors", 64 << 20)
    refused(target, padded, r"adapter_model.safetensors holds 67,108,864 bytes; a pack of this config has at most")
    lying = craft(files["me"], tmp_path / "lying.zip", replace={"adapter/adapter_model.safetensors": None})
    add_bomb(lying, "adapter/adapter_model.safetensors", 64 << 20, declared=len(honest))  # inflates past it
    refused(target, lying, "adapter_model.safetensors cannot be read")


def test_a_failing_import_removes_only_what_it_created_and_the_name_stays_free(exports, target, tmp_path):
    _, files = exports
    weights = members(files["me"])["adapter/adapter_model.safetensors"]
    corrupt = craft(files["me"], tmp_path / "corrupt.zip",
                    replace={"adapter/adapter_model.safetensors": weights[:8] + b"\xff" * (len(weights) - 8)})
    refused(target, corrupt, "its adapter does not load", name="me")
    info = target.import_pack(files["me"], "me")  # the name was given back
    assert info["active_version"] == 1
    assert target.chat(QUESTION, options=SHORT, pack="me", save=False).reply
    assert pack_folders(target) == ["me"]


def test_a_folder_left_under_the_name_is_kept_and_the_import_refused(exports, target):
    _, files = exports
    stray = target.settings.home / "packs" / "me" / "keep.txt"
    stray.parent.mkdir(parents=True)
    stray.write_text("not the importer's")
    refused(target, files["me"], "exists but no pack uses it", name="me")
    assert stray.read_text() == "not the importer's"


# --- mapped tables ------------------------------------------------------------------------------------------

@pytest.mark.parametrize("delta", [True, False])
def test_a_mapped_table_that_names_another_table_as_its_base_is_refused(exports, target, tmp_path, delta):
    _, files = exports
    target.import_pack(files["mapped"], "private")  # the user's own mapped pack
    private = target.settings.home / "packs" / "private" / "v1" / "table"
    empty = members(files["mapped"])

    def chain(table: dict) -> None:
        table.update(base=str(private), delta=delta)

    path = craft(files["mapped"], tmp_path / "chain.zip", table=chain, replace={
        "adapter/table/rows.npy": empty["adapter/table/rows.npy"],
        "adapter/table/values.npy": empty["adapter/table/values.npy"]})
    message = refused(target, path, "its table is not self-contained")
    assert str(private)[:20] in message
    delta_only = craft(files["mapped"], tmp_path / "delta.zip", table=lambda t: t.update(delta=True))
    refused(target, delta_only, "its table is not self-contained")


def test_a_mapped_table_of_another_shape_than_its_config_is_refused(exports, target, tmp_path):
    _, files = exports
    path = craft(files["mapped"], tmp_path / "shape.zip", table=lambda t: t.update(rows=10**12))
    refused(target, path, r"its table \(adapter/table/table.json\) does not match its memory config")


# --- the base model -------------------------------------------------------------------------------------

@pytest.mark.parametrize("base", ["someone/not-here-model", "/elsewhere/other-model", "~/models/x.gguf", "../../etc"])
def test_a_base_model_the_user_does_not_have_is_refused_and_nothing_is_loaded(exports, target, tmp_path,
                                                                             monkeypatch, base):
    _, files = exports

    def no_loading(*args, **kwargs):
        raise AssertionError("a base model was loaded for a pack file naming one the user does not have")

    monkeypatch.setattr(transfer, "load_base_model", no_loading)
    path = craft(files["me"], tmp_path / "base.zip", lambda m: m.update(base_model=base))
    refused(target, path, "which this app does not have")


def test_a_base_model_named_by_an_old_absolute_path_is_the_users_copy_of_that_name(exports, target, tmp_path):
    _, files = exports
    path = craft(files["me"], tmp_path / "old.zip", lambda m: m.update(base_model="/home/someone/models/tiny-llama"))
    assert target.import_pack(path, "old")["base_model"] == target.settings.model


# --- the evaluation ----------------------------------------------------------------------------------------

@pytest.mark.parametrize("evaluation", [
    {"steps": 5, "recall": "lots"},
    {"memorisation": {"before": "high", "after": 1.0, "change": None}},
    {"recall": {"memory_on": {"recall": None, "mean_logprob": 0.0}, "memory_off": {"recall": 0.0,
                                                                                  "mean_logprob": 0.0}, "probes": 1}},
    "not a block",
])
def test_an_evaluation_that_breaks_its_schema_is_dropped_and_the_pack_imports(exports, target, tmp_path, evaluation):
    from engram_app.ui.train_tab import version_rows

    _, files = exports
    path = craft(files["me"], tmp_path / "evaluation.zip", lambda m: m.update(evaluation=evaluation))
    target.import_pack(path, "copy")
    kept = target.pack("copy")["versions"][0]["evaluation"]
    assert set(kept) == {"imported"} and kept["imported"]["file"] == "evaluation.zip"
    assert version_rows(target, "copy")[0][0] == 1  # the Training tab's table still renders


def test_an_evaluation_keeps_its_figures_and_loses_any_text(exports, target, tmp_path):
    _, files = exports
    figures = {"steps": 5, "outcome": "done", "recall": {"memory_on": {"recall": 1.0, "mean_logprob": -1.0},
                                                        "memory_off": {"recall": 0.0, "mean_logprob": -3.0},
                                                        "probes": 1, "examples": [{"prompt": "What is my name?"}]},
               "notes": "My name is Ada"}
    target.import_pack(craft(files["me"], tmp_path / "text.zip", lambda m: m.update(evaluation=figures)), "copy")
    kept = target.pack("copy")["versions"][0]["evaluation"]
    assert kept["recall"] == {k: v for k, v in figures["recall"].items() if k != "examples"}
    assert "notes" not in kept and kept["steps"] == 5 and kept["outcome"] == "done"


# --- names ----------------------------------------------------------------------------------------------

def test_two_concurrent_imports_under_one_name_leave_one_working_pack(exports, target, monkeypatch):
    """The first import holds the name while it loads the model; the second is refused, touches
    nothing, and the first ends with a pack that loads and chats."""
    source, files = exports
    second = Service(target.settings)
    first_inside, second_done = threading.Event(), threading.Event()
    load = transfer.load_base_model

    def slow_load(*args, **kwargs):
        if threading.current_thread().name == "first":
            first_inside.set()
            assert second_done.wait(60)
        return load(*args, **kwargs)

    monkeypatch.setattr(transfer, "load_base_model", slow_load)
    outcome: dict[str, object] = {}

    def run(service: Service, key: str) -> None:
        try:
            outcome[key] = service.import_pack(files["me"], "same")
        except EngramError as exc:
            outcome[key] = exc
        finally:
            if key == "second":
                second_done.set()

    first = threading.Thread(target=run, args=(target, "first"), name="first")
    first.start()
    assert first_inside.wait(60)
    run(second, "second")
    first.join(60)
    assert isinstance(outcome["second"], EngramError) and "exists already" in str(outcome["second"])
    assert isinstance(outcome["first"], dict) and outcome["first"]["active_version"] == 1
    assert pack_folders(target) == ["same"]
    assert sorted(p.name for p in (target.settings.home / "packs" / "same").iterdir()) == ["v1"]
    reply = Service(target.settings).chat(QUESTION, options=SHORT, pack="same", save=False).reply
    assert reply == source.chat(QUESTION, options=SHORT, pack="me", save=False).reply


def test_two_imports_racing_freely_for_one_name_end_with_exactly_one_pack(exports, target):
    _, files = exports
    services = [Service(target.settings), Service(target.settings)]
    start = threading.Barrier(2)
    results: list[object] = [None, None]

    def run(i: int) -> None:
        start.wait()
        try:
            results[i] = services[i].import_pack(files["me"], "race")
        except EngramError as exc:
            results[i] = exc

    threads = [threading.Thread(target=run, args=(i,)) for i in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(120)
    assert sorted(type(r).__name__ for r in results) == ["EngramError", "dict"]
    assert "exists already" in str(next(r for r in results if isinstance(r, EngramError)))
    assert pack_folders(target) == ["race"]
    assert target.chat(QUESTION, options=SHORT, pack="race", save=False).reply


# --- primes ----------------------------------------------------------------------------------------------

def test_is_prime_is_exact_and_next_prime_is_fast_for_huge_numbers():
    def trial(n: int) -> bool:
        return n >= 2 and all(n % f for f in range(2, int(n**0.5) + 1))

    assert [n for n in range(20_000) if is_prime(n)] == [n for n in range(20_000) if trial(n)]
    # Carmichael numbers and strong pseudoprimes to the first bases are composite.
    for composite in (561, 41041, 2047, 1_373_653, 3_215_031_751, 3_825_123_056_546_413_051, (2**61 - 1) * 3):
        assert not is_prime(composite)
    for prime in (2**31 - 1, 2**61 - 1, 2**89 - 1):
        assert is_prime(prime)
    started = time.perf_counter()
    assert next_prime(10**30, set()) == 10**30 + 57
    assert next_prime(10**18, {10**18 + 3}) == 10**18 + 9
    assert time.perf_counter() - started < 0.5
    for preset in PRESETS.values():  # every preset's tables keep the sizes trial division gave them
        expected, n = [], preset.rows_per_head
        while len(expected) < 16:
            expected += [n] if trial(n) else []
            n += 1
        taken: set[int] = set()
        for _ in range(16):
            taken.add(next_prime(preset.rows_per_head, taken))
        assert sorted(taken) == expected
