"""The Engram memory engine on tiny random models of every supported family."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file
from tokenizers import Tokenizer, models
from transformers import PreTrainedTokenizerFast

from engram_app.engram import (
    EngramAttachError,
    EngramConfig,
    EngramOptimizer,
    attach_engram,
    attach_lora,
    load_engram,
    save_engram,
    trace_tokens,
)
from engram_app.engram.compression import build_compression
from engram_app.engram.optim import RowwiseAdam
from tiny import FAMILY_CONFIGS, tiny_family, tiny_tokenizer

SMALL = EngramConfig(layers=[1], heads=4, rows_per_head=1009, head_dim=8)


@pytest.fixture(scope="module")
def tokenizer():
    return tiny_tokenizer()


def randomise(memory) -> None:
    """Move the zero-initialised parts away from zero, as training would."""
    torch.manual_seed(123)
    with torch.no_grad():
        for block in memory.blocks.values():
            block.value.weight.normal_(0, 0.5)
            if block.use_conv:
                block.conv.weight.normal_(0, 0.5)


def sample_ids(n: int, vocab: int = 400, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(3, vocab, (1, n), generator=g)


# --- identity at initialisation ---------------------------------------------------------------

@pytest.mark.parametrize("family", sorted(FAMILY_CONFIGS))
def test_identity_at_initialisation(family, tokenizer):
    model = tiny_family(family)
    ids = sample_ids(24)
    with torch.no_grad():
        base = model(ids).logits.clone()
    memory = attach_engram(model, tokenizer, EngramConfig(layers=[0, 2], heads=4, rows_per_head=1009, head_dim=8))
    with torch.no_grad():
        adapted = model(ids).logits
    assert torch.equal(base, adapted)
    assert all(not p.requires_grad for p in model.parameters())
    # The test can fail: once the value projection moves, the logits move.
    randomise(memory)
    with torch.no_grad():
        assert not torch.allclose(base, model(ids).logits)


@pytest.mark.parametrize("family", sorted(FAMILY_CONFIGS))
def test_detach_restores_the_base_model(family, tokenizer):
    model = tiny_family(family)
    ids = sample_ids(16)
    with torch.no_grad():
        base = model(ids).logits.clone()
    memory = attach_engram(model, tokenizer, SMALL)
    randomise(memory)
    memory.detach()
    with torch.no_grad():
        assert torch.equal(base, model(ids).logits)


# --- addressing ---------------------------------------------------------------------------------

def rows_at(memory, ids: torch.Tensor, position: int) -> dict[int, list[int]]:
    """{order: rows} of the first Engram layer at ``position``."""
    with torch.no_grad(), memory.tracing() as calls:
        memory.base_model(ids)
    rows = calls[-1][memory.layer_ids[0]].rows[0, position].tolist()
    out: dict[int, list[int]] = {}
    for (order, _head), row in zip(memory.layout.slot_names(), rows):
        out.setdefault(order, []).append(row)
    return out


def test_ngrams_end_at_the_current_token(tokenizer):
    model = tiny_family("llama")
    memory = attach_engram(model, tokenizer, SMALL)
    ids = sample_ids(12)
    t = 8
    before = rows_at(memory, ids, t)

    changed_current = ids.clone()
    changed_current[0, t] = 7 if ids[0, t] != 7 else 8
    after = rows_at(memory, changed_current, t)
    assert all(a != b for a, b in zip(after[2], before[2])), "2-gram rows must depend on the current token"
    assert all(a != b for a, b in zip(after[3], before[3])), "3-gram rows must depend on the current token"

    changed_previous = ids.clone()
    changed_previous[0, t - 1] = 7 if ids[0, t - 1] != 7 else 8
    after = rows_at(memory, changed_previous, t)
    assert after[2] != before[2] and after[3] != before[3]

    changed_two_back = ids.clone()
    changed_two_back[0, t - 2] = 7 if ids[0, t - 2] != 7 else 8
    after = rows_at(memory, changed_two_back, t)
    assert after[2] == before[2] and after[3] != before[3]

    changed_three_back = ids.clone()
    changed_three_back[0, t - 3] = 7 if ids[0, t - 3] != 7 else 8
    assert rows_at(memory, changed_three_back, t) == before


def test_heads_use_distinct_primes_across_orders_and_layers(tokenizer):
    memory = attach_engram(tiny_family("llama"), tokenizer, EngramConfig(layers=[0, 2], heads=8, rows_per_head=5000, head_dim=4))
    primes = memory.layout.primes.flatten().tolist()
    assert len(set(primes)) == len(primes) == 2 * 2 * 8
    assert all(p >= 5000 for p in primes)
    assert memory.table.num_rows == sum(primes)
    assert (memory.layout.multipliers % 2 == 1).all()


def deep_llama(blocks: int) -> torch.nn.Module:
    from transformers import AutoConfig, AutoModelForCausalLM

    settings = {**FAMILY_CONFIGS["llama"], "num_hidden_layers": blocks}
    config = AutoConfig.for_model(settings.pop("model_type"), vocab_size=512, **settings)
    return AutoModelForCausalLM.from_config(config, attn_implementation="eager").eval()


@pytest.mark.parametrize("blocks, layers, depth, placed", [
    (8, None, 0.5, [4]),     # the presets' depth: the middle block
    (30, None, 0.5, [15]),   # SmolLM2-135M's 30 blocks
    (8, None, None, [1]),    # no depth (memories saved before it existed): the 2nd block, as before
    (8, [0, 6], 0.5, [0, 6]),  # layers named: they win
    (8, None, 0.0, [0]),
    (8, None, 0.99, [7]),
])
def test_depth_places_the_memory_that_far_through_the_model(tokenizer, blocks, layers, depth, placed):
    config = EngramConfig(layers=layers, depth=depth, heads=2, rows_per_head=101, head_dim=4)
    memory = attach_engram(deep_llama(blocks), tokenizer, config)
    assert memory.layer_ids == placed and memory.config.layers == placed  # resolved into the saved config


def test_depth_is_saved_only_when_set_and_checked():
    assert "depth" not in EngramConfig().to_dict()
    assert EngramConfig.from_dict(EngramConfig(depth=0.5).to_dict()).depth == 0.5
    for bad in (1.0, -0.1, True, "0.5"):
        with pytest.raises(ValueError, match="depth must be a fraction"):
            EngramConfig(depth=bad)


def test_a_new_pack_sits_mid_model_and_a_pack_file_made_before_keeps_its_block():
    from pathlib import Path

    from engram_app.training.sizes import PRESET_DEPTH, PRESETS
    from engram_app.training.transfer import PackFile, engram_config

    preset = PRESETS["medium"]
    assert preset.engram_config().depth == PRESET_DEPTH == 0.5  # what a pack created now gets
    saved_now = preset.engram_config().to_dict()
    saved_before = {k: v for k, v in saved_now.items() if k != "depth"}  # field absent: block 1, as made
    pack = PackFile(Path("old.zip"), None, {})
    assert engram_config(pack, saved_now, preset, "pack.json").depth == 0.5
    assert engram_config(pack, saved_before, preset, "pack.json").depth is None


# --- compression --------------------------------------------------------------------------------

def word_tokenizer(words: list[str]) -> PreTrainedTokenizerFast:
    vocab = {w: i for i, w in enumerate(["<unk>", *words])}
    return PreTrainedTokenizerFast(tokenizer_object=Tokenizer(models.WordLevel(vocab, unk_token="<unk>")))


def test_compression_merges_case_accents_and_unicode_forms():
    nfc, nfd = "caf\u00e9", "cafe\u0301"
    words = ["Café", "CAFE", nfc, nfd, "cafe", "\ufb01ne", "fine", "dog", "   ", "\t"]
    tok = word_tokenizer(words)
    mapping = build_compression(tok)
    cid = {w: int(mapping[tok.convert_tokens_to_ids(w)]) for w in words}
    assert cid["Café"] == cid["CAFE"] == cid[nfc] == cid[nfd] == cid["cafe"]
    assert cid["\ufb01ne"] == cid["fine"]  # NFKC: the ligature is two letters
    assert cid["   "] == cid["\t"]  # whitespace-only tokens become one space
    assert cid["dog"] != cid["cafe"]
    assert len(set(cid.values())) == 4


def test_compression_keeps_byte_fragments_apart(tokenizer):
    mapping = build_compression(tokenizer)
    fragments = [i for i in range(len(tokenizer)) if "\ufffd" in tokenizer.decode([i])]
    assert len(fragments) > 10
    assert len({int(mapping[i]) for i in fragments}) == len(fragments)


def test_compression_is_deterministic_across_processes(tiny_model_dir):
    code = (
        "import hashlib, sys; from transformers import AutoTokenizer; "
        "from engram_app.engram.compression import build_compression; "
        f"t = AutoTokenizer.from_pretrained({str(tiny_model_dir)!r}); "
        "print(hashlib.sha256(build_compression(t).numpy().tobytes()).hexdigest())"
    )
    runs = {subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                           env={"PYTHONHASHSEED": str(seed), "PATH": ""}).stdout for seed in (1, 2)}
    assert len(runs) == 1


# --- cached generation --------------------------------------------------------------------------

def test_cached_generation_equals_uncached_with_left_padding_beyond_2048_tokens(tokenizer):
    model = tiny_family("llama")
    memory = attach_engram(model, tokenizer, SMALL)
    randomise(memory)
    lengths = [2100, 2060]
    prompts = [sample_ids(n, seed=i)[0] for i, n in enumerate(lengths)]
    width = max(lengths)
    ids = torch.zeros(2, width, dtype=torch.long)
    mask = torch.zeros(2, width, dtype=torch.long)
    for i, p in enumerate(prompts):
        ids[i, width - len(p):] = p
        mask[i, width - len(p):] = 1
    new = 6
    with torch.no_grad(), memory.tracing() as calls:
        out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=new, min_new_tokens=new,
                             do_sample=False, pad_token_id=0, use_cache=True)
    assert len(calls) == new  # one prefill + (new - 1) decoding steps
    layer = memory.layer_ids[0]
    for i, p in enumerate(prompts):
        generated = out[i, width:]
        # The same sequence alone, unpadded, without a cache: one forward over everything.
        with torch.no_grad():
            solo = model.generate(input_ids=p[None], max_new_tokens=new, min_new_tokens=new, do_sample=False,
                                  pad_token_id=0, use_cache=False)[0, len(p):]
        assert torch.equal(generated, solo), "cached, padded generation chose other tokens"
        full = torch.cat([p, generated[:-1]])[None]
        with torch.no_grad(), memory.tracing() as full_calls:
            model(full, use_cache=False)
        reference = full_calls[-1][layer]
        # Decoding steps: the trace of step s covers position len(p) + s - 1.
        for s in range(1, new):
            step = calls[s][layer]
            pos = len(p) + s - 1
            assert torch.equal(step.rows[i, 0], reference.rows[0, pos])
            assert torch.allclose(step.gate[i, 0], reference.gate[0, pos], atol=1e-5)
        # Prefill: the padded prompt's real positions match the unpadded ones.
        prefill = calls[0][layer]
        assert torch.equal(prefill.rows[i, width - len(p):], reference.rows[0, : len(p)])
        assert torch.allclose(prefill.gate[i, width - len(p):], reference.gate[0, : len(p)], atol=1e-5)


def test_a_cache_made_without_memory_is_refused(tokenizer):
    model = tiny_family("llama")
    ids = sample_ids(10)
    with torch.no_grad():
        cache = model(ids, use_cache=True).past_key_values
    attach_engram(model, tokenizer, SMALL)
    with pytest.raises(EngramAttachError, match="not produced with the Engram memory"):
        with torch.no_grad():
            model(ids[:, -1:], past_key_values=cache, use_cache=True)


def test_two_caches_do_not_mix(tokenizer):
    model = tiny_family("llama")
    memory = attach_engram(model, tokenizer, SMALL)
    randomise(memory)
    a, b = sample_ids(20, seed=1), sample_ids(20, seed=2)
    with torch.no_grad():
        cache_a = model(a[:, :-1], use_cache=True).past_key_values
        model(b[:, :-1], use_cache=True)  # another conversation in between, with its own cache
        step_a = model(a[:, -1:], past_key_values=cache_a, use_cache=True).logits[0, -1]
        full_a = model(a, use_cache=False).logits[0, -1]
    assert torch.allclose(step_a, full_a, atol=1e-5)


# --- training -----------------------------------------------------------------------------------

def test_training_moves_only_the_addressed_rows(tokenizer):
    model = tiny_family("llama")
    memory = attach_engram(model, tokenizer, SMALL)
    base_before = {k: v.clone() for k, v in model.state_dict().items()}
    table_before = memory.table.weight.detach().clone()
    optimizer = EngramOptimizer(memory, lr=1e-2)
    ids = sample_ids(32)
    # Two steps: at initialisation W_V = 0, so the first step's table gradients are all zero.
    with memory.tracing() as calls:
        for _ in range(2):
            optimizer.zero_grad()
            model(ids, labels=ids).loss.backward()
            assert memory.table.weight.grad.is_sparse
            optimizer.step()
    addressed = set(calls[-1][1].rows.flatten().tolist())
    # The last position predicts nothing (no label), so rows read only there get no gradient.
    learned_from = set(calls[-1][1].rows[:, :-1].flatten().tolist())
    moved = set((memory.table.weight.detach() != table_before).any(dim=1).nonzero().flatten().tolist())
    assert moved and moved <= addressed
    assert moved == learned_from
    for key, value in model.state_dict().items():
        assert torch.equal(value, base_before[key]), f"base weight {key} changed"


def test_optimizer_split_gives_tables_the_higher_rate(tokenizer):
    memory = attach_engram(tiny_family("llama"), tokenizer, SMALL)
    optimizer = EngramOptimizer(memory, lr=1e-3)
    sparse, dense = optimizer.optimizers
    assert isinstance(sparse, RowwiseAdam) and sparse.param_groups[0]["lr"] == pytest.approx(5e-3)
    assert dense.param_groups[0]["lr"] == pytest.approx(1e-3)
    assert all(p is not memory.table.weight for p in dense.param_groups[0]["params"])


def test_short_training_lowers_the_loss_of_its_text(tokenizer):
    model = tiny_family("llama")
    memory = attach_engram(model, tokenizer, EngramConfig(layers=[0], heads=4, rows_per_head=4001, head_dim=16))
    text = tokenizer("I have a turtle named Timothy and a dog called Pixel.", return_tensors="pt").input_ids
    with torch.no_grad():
        before = model(text, labels=text).loss.item()
    optimizer = EngramOptimizer(memory, lr=1e-2)
    for _ in range(40):
        optimizer.zero_grad()
        model(text, labels=text).loss.backward()
        optimizer.step()
    with torch.no_grad():
        after = model(text, labels=text).loss.item()
    assert after < 0.85 * before


# --- save / load --------------------------------------------------------------------------------

LOAD_AND_SCORE = """
import sys, torch
from safetensors.torch import save_file
sys.path.insert(0, {tests!r})
from tiny import tiny_family, tiny_tokenizer
from engram_app.engram import load_engram, load_lora
model = tiny_family("llama", seed=0)
model = load_lora(model, {folder!r})
base = model.get_base_model() if hasattr(model, "get_base_model") else model
load_engram(base, tiny_tokenizer(), {folder!r})
ids = torch.arange(3, 40)[None]
with torch.no_grad():
    save_file({{"logits": model(ids).logits}}, {out!r})
"""


def logits_in_fresh_process(folder, out) -> torch.Tensor:
    from conftest import ROOT

    code = LOAD_AND_SCORE.format(tests=str(ROOT / "tests"), folder=str(folder), out=str(out))
    subprocess.run([sys.executable, "-c", code], check=True, cwd=ROOT)
    return load_file(out)["logits"]


def test_save_then_load_in_a_fresh_process_reproduces_logits(tokenizer, tmp_path):
    model = tiny_family("llama", seed=0)
    memory = attach_engram(model, tokenizer, SMALL)
    randomise(memory)
    folder = save_engram(memory, tmp_path / "memory")
    assert {p.name for p in folder.iterdir()} == {"adapter_config.json", "adapter_model.safetensors"}
    with torch.no_grad():
        expected = model(torch.arange(3, 40)[None]).logits
    assert torch.equal(logits_in_fresh_process(folder, tmp_path / "out.safetensors"), expected)


def test_loading_onto_another_base_model_is_refused(tokenizer, tmp_path):
    memory = attach_engram(tiny_family("llama", seed=0), tokenizer, SMALL)
    folder = save_engram(memory, tmp_path / "memory")
    with pytest.raises(EngramAttachError, match="trained for another base model"):
        load_engram(tiny_family("llama", seed=1), tokenizer, folder)
    with pytest.raises(EngramAttachError, match="trained for another base model"):
        load_engram(tiny_family("qwen2", seed=0), tokenizer, folder)


def test_engram_and_lora_train_and_save_together(tokenizer, tmp_path):
    model = tiny_family("llama", seed=0)
    memory = attach_engram(model, tokenizer, SMALL)
    peft_model = attach_lora(model, r=4)
    lora_params = [p for n, p in peft_model.named_parameters() if "lora_" in n]
    assert lora_params and all(p.requires_grad for p in lora_params)
    lora_before = [p.detach().clone() for p in lora_params]
    table_before = memory.table.weight.detach().clone()
    optimizer = EngramOptimizer(memory, lr=1e-2, extra_parameters=lora_params)
    ids = sample_ids(24)
    for _ in range(3):
        optimizer.zero_grad()
        peft_model(input_ids=ids, labels=ids).loss.backward()
        optimizer.step()
    assert any(not torch.equal(a, b) for a, b in zip(lora_before, lora_params)), "LoRA did not train"
    assert not torch.equal(table_before, memory.table.weight), "the memory did not train"
    folder = save_engram(memory, tmp_path / "memory", lora_model=peft_model)
    assert (folder / "lora" / "adapter_config.json").is_file()
    with torch.no_grad():
        expected = peft_model(input_ids=torch.arange(3, 40)[None]).logits
    assert torch.equal(logits_in_fresh_process(folder, tmp_path / "out.safetensors"), expected)


# --- trace --------------------------------------------------------------------------------------

def test_trace_reports_every_slot_with_its_ngram(tokenizer):
    model = tiny_family("llama")
    memory = attach_engram(model, tokenizer, EngramConfig(layers=[0, 2], heads=8, rows_per_head=1009, head_dim=4))
    ids = tokenizer("I have a turtle named Timothy").input_ids
    traces = trace_tokens(memory, tokenizer, ids)
    assert [t.id for t in traces] == ids
    for t in traces:
        assert [m.layer for m in t.memory] == [0, 2]
        for report in t.memory:
            assert 0 < report.gate < 1 and report.ratio == 0.0  # identity at init: nothing added yet
            assert len(report.slots) == 16
            for slot in report.slots:
                pieces = slot.ngram.split("|")
                assert len(pieces) == slot.order
                assert pieces[-1] == tokenizer.decode([t.id])  # the n-gram ends at this token
                assert memory.layout.locate(slot.row)[:3] == (report.layer, slot.order, slot.head)
    first = traces[0].memory[0].slots[0]
    assert first.ngram.startswith("<s>|")
    data = traces[3].to_json()
    assert set(data) == {"text", "id", "memory"}
    assert set(data["memory"][0]["slots"][0]) == {"order", "head", "row", "ngram"}


def test_the_memory_owns_only_its_own_weights(tokenizer):
    model = tiny_family("llama")
    memory = attach_engram(model, tokenizer, SMALL)
    names = set(memory.state_dict())
    assert names == {"table.embedding.weight"} | {n for n in names if n.startswith("blocks.")}
    base_ids = {id(p) for p in model.parameters()}
    assert not any(id(p) in base_ids for p in memory.parameters())


def test_table_optimizer_state_grows_with_rows_touched_not_table_size(tokenizer):
    memory = attach_engram(tiny_family("llama"), tokenizer, EngramConfig(layers=[1], heads=4, rows_per_head=200_003, head_dim=8))
    optimizer = EngramOptimizer(memory, lr=1e-2)
    table_opt = optimizer.optimizers[0]
    touched: set[int] = set()
    for seed in range(3):
        ids = sample_ids(32, seed=seed)
        with memory.tracing() as calls:
            optimizer.zero_grad()
            memory.base_model(ids, labels=ids).loss.backward()
            optimizer.step()
        touched |= set(calls[-1][1].rows.flatten().tolist())
    assert set(table_opt.rows.tolist()) <= touched and len(table_opt.rows) > 0
    per_row = 2 * 8 * 4 + 2 * 8  # two moments of d_h floats, a row id and a step count
    assert table_opt.state_bytes() == len(table_opt.rows) * per_row
    assert table_opt.state_bytes() < 0.01 * memory.table.weight.numel() * 4


def test_rowwise_adam_matches_dense_adam_on_the_rows_it_updates():
    torch.manual_seed(0)
    weight = torch.nn.Parameter(torch.randn(50, 4))
    reference = torch.nn.Parameter(weight.detach().clone())
    ours, adam = RowwiseAdam(weight, lr=0.1), torch.optim.Adam([reference], lr=0.1)
    for _ in range(4):  # the same rows every step: lazy Adam equals Adam on them
        target = torch.randn(50, 4)
        for param, opt in ((weight, ours), (reference, adam)):
            opt.zero_grad()
            ((param[:10] - target[:10]) ** 2).sum().backward()
            opt.step()
    assert torch.allclose(weight[:10], reference[:10], atol=1e-5)
    assert torch.equal(weight[10:], reference[10:])
