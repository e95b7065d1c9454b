"""The 4-bit chat runtime (engram_app/inference/quant.py): GGUF blocks, the int4 layer, a model on it.

Tiny random models quantised to Q4_1 the way llama.cpp's converter does (gguf-py), against their
"dequantised twin": the same model with fp32 weights equal to what the blocks stand for.
"""

from __future__ import annotations

import copy
from pathlib import Path

import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType, quants
from peft import LoraConfig, PeftModel, get_peft_model

from engram_app.engram import EngramConfig, attach_engram
from engram_app.engram.layer import EngramBlock, use_native_step
from engram_app.engram.model import model_fingerprint
from engram_app.inference import native
from engram_app.inference.lean import lean_decoder
from engram_app.inference.quant import (
    Int4Linear,
    LayerBlocks,
    RescoredLogits,
    decode_logits,
    load_layers,
    mapped_weights,
    quantize_model,
    quantize_q4_1,
    save_layers,
    unpack_q4_1,
    unpack_q8_0_as_q4,
)
from engram_app.models import load_base_model, use_int4
from engram_app.settings import resolve_device
from tiny import tiny_llama, tiny_tokenizer

PROMPT = [[1, 40, 41, 42, 43, 44, 45, 46]]


def random_weight(rows: int, cols: int, seed: int = 0) -> np.ndarray:
    generator = np.random.default_rng(seed)
    return (generator.standard_normal((rows, cols)) * 0.05 + generator.uniform(-0.02, 0.02, (rows, 1))).astype(np.float32)


# --- blocks -------------------------------------------------------------------------------------


def test_q4_1_bytes_unpack_to_exactly_the_weights_gguf_dequantises_them_to():
    raw = quants.quantize(random_weight(48, 96), GGMLQuantizationType.Q4_1)
    blocks = unpack_q4_1(raw)
    reference = quants.dequantize(raw, GGMLQuantizationType.Q4_1)
    assert blocks.codes.dtype == torch.uint8 and int(blocks.codes.max()) <= 15
    assert blocks.shape == (48, 96) and blocks.scale.shape == (48, 3)
    assert torch.equal(blocks.dequantize(), torch.from_numpy(reference))


def test_q8_0_bytes_split_into_two_4_bit_halves_that_add_up_to_exactly_the_gguf_weights():
    raw = quants.quantize(random_weight(40, 64, seed=1), GGMLQuantizationType.Q8_0)
    blocks = unpack_q8_0_as_q4(raw)
    reference = torch.from_numpy(quants.dequantize(raw, GGMLQuantizationType.Q8_0))
    halves = blocks.dequantize()
    assert blocks.shape == (40, 128) and int(blocks.codes.max()) <= 15
    assert torch.equal(halves[:, :64] + halves[:, 64:], reference)


@pytest.mark.parametrize("kernel", ["native", "bf16"])
def test_saved_int4_layers_load_back_bit_for_bit_and_only_for_the_source_and_kernel_they_were_written_for(
        twins, tmp_path, kernels, kernel):
    use = kernels if kernel == "native" else None
    model = quantised(twins, compute_dtype=torch.bfloat16, kernels=use)
    path = tmp_path / "int4.safetensors"
    save_layers(path, model, source="gguf-1")
    loaded = load_layers(path, source="gguf-1", kernels=use)
    originals = {n: m for n, m in model.named_modules() if isinstance(m, Int4Linear)}
    assert set(loaded) == set(originals) and len(loaded) == 14
    x = torch.randn(1, 64)  # one row: the 4-bit kernel (the loaded layers have no fp32 weight for prompts)
    for name, layer in originals.items():
        assert loaded[name].backend == layer.backend == ("native" if use else "torch-bfloat16")
        assert torch.equal(loaded[name].qweight, layer.qweight)
        if layer.in_features == 64:
            assert torch.equal(loaded[name](x), layer(x))
    assert load_layers(path, source="gguf-2", kernels=use) is None
    if use:  # the C kernel reads raw memory: a layout it was not written for is refused, never read
        layer = next(iter(originals.values()))
        with pytest.raises(ValueError, match="layout"):
            Int4Linear.from_packed(layer.qweight.to(torch.int32), layer.scales_and_mins, layer.in_features,
                                   layer.out_features, 32, kernels=use)
        with pytest.raises(ValueError, match="layout"):
            Int4Linear.from_packed(layer.qweight, layer.scales_and_mins.half(), layer.in_features,
                                   layer.out_features, 32, kernels=use)
    assert load_layers(path, source="gguf-1", kernels=None if use else kernels) is None  # the other kernel's layout
    path.write_bytes(b"not safetensors")
    assert load_layers(path, source="gguf-1", kernels=use) is None


# --- the layer ----------------------------------------------------------------------------------


def test_int4_linear_computes_the_dequantised_fp32_linear_exactly_in_fp32_and_to_bf16_rounding_in_bf16():
    blocks = quantize_q4_1(torch.from_numpy(random_weight(96, 128, seed=2)))
    bias = torch.randn(96)
    x = torch.randn(2, 5, 128)
    reference = torch.nn.functional.linear(x, blocks.dequantize(), bias)
    exact = Int4Linear(blocks, bias, compute_dtype=torch.float32)(x)
    fast = Int4Linear(blocks, bias)(x)
    assert exact.shape == fast.shape == (2, 5, 96) and fast.dtype == torch.float32
    torch.testing.assert_close(exact, reference, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(fast, reference, rtol=2e-2, atol=2e-2)
    assert not torch.equal(fast, reference)  # bf16 really is computed: the check above is not vacuous


def test_the_native_kernel_gives_the_dequantised_layers_output_to_fp32_rounding_for_any_number_of_rows(kernels):
    assert kernels.vectorised > 0  # this machine has AVX2 or AVX-512: the vectorised loops are what is tested
    q4 = quantize_q4_1(torch.from_numpy(random_weight(80, 96, seed=4)))
    raw = quants.quantize(random_weight(48, 64, seed=5), GGMLQuantizationType.Q8_0)
    q8 = torch.from_numpy(quants.dequantize(raw, GGMLQuantizationType.Q8_0))
    cases = [(Int4Linear(q4, kernels=kernels), q4.dequantize()),
             (Int4Linear(unpack_q8_0_as_q4(raw), input_copies=2, kernels=kernels), q8)]
    for layer, weight in cases:
        for rows in (1, 3, 8, 11):  # 11: more than the kernel takes at once, in two calls
            x = torch.randn(rows, weight.shape[1])
            reference = (x.double() @ weight.double().T).float()
            got = layer(x)
            assert layer.dense is None and got.shape == reference.shape
            torch.testing.assert_close(got, reference, rtol=1e-5, atol=1e-5)
    bf16 = Int4Linear(q4)(x := torch.randn(1, 96))
    exact = (x.double() @ q4.dequantize().double().T).float()
    assert (Int4Linear(q4, kernels=kernels)(x) - exact).abs().max() * 100 < (bf16 - exact).abs().max()


def test_one_row_goes_through_the_4_bit_kernel_and_several_through_the_layers_fp32_weight(kernels):
    blocks = quantize_q4_1(torch.from_numpy(random_weight(64, 96, seed=6)))
    bias = torch.randn(64)
    layer = Int4Linear(blocks, bias, kernels=kernels)
    layer.dense = torch.from_numpy(random_weight(64, 96, seed=7))  # another weight, to see which path ran
    one, several = torch.randn(1, 1, 96), torch.randn(1, 5, 96)
    torch.testing.assert_close(layer(several), torch.nn.functional.linear(several, layer.dense, bias))
    torch.testing.assert_close(layer(one), torch.nn.functional.linear(one, blocks.dequantize(), bias),
                               rtol=1e-5, atol=1e-5)


def test_without_a_c_compiler_or_with_engram_native_off_there_is_no_kernel_and_chat_uses_the_bf16_one(
        tmp_path, monkeypatch):
    native.load_kernels.cache_clear()
    monkeypatch.setenv("ENGRAM_NATIVE", "0")
    assert native.load_kernels(tmp_path / "a") is None
    monkeypatch.delenv("ENGRAM_NATIVE")
    monkeypatch.setattr(native, "COMPILERS", ("no-such-compiler-here",))
    assert native.load_kernels(tmp_path / "b") is None
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()
    native.load_kernels.cache_clear()


def test_a_compiler_refusing_the_first_flags_builds_with_the_next_ones(tmp_path, monkeypatch):
    native.load_kernels.cache_clear()
    monkeypatch.setattr(native, "FLAG_SETS", (("-O3", "--no-such-flag-anywhere"), ("-O2",)))  # e.g. no -fopenmp
    built = native.load_kernels(tmp_path)
    native.load_kernels.cache_clear()
    assert built is not None and not built.threaded  # built without OpenMP: one thread, same results
    blocks = quantize_q4_1(torch.from_numpy(random_weight(64, 96, seed=8)))
    x = torch.randn(1, 96)
    torch.testing.assert_close(Int4Linear(blocks, kernels=built)(x), x @ blocks.dequantize().T, rtol=1e-5, atol=1e-5)


def test_the_kernel_refuses_anything_but_its_own_layout_before_reading_a_byte(kernels):
    blocks = quantize_q4_1(torch.from_numpy(random_weight(64, 96, seed=9)))
    layer = Int4Linear(blocks, kernels=kernels)
    x = torch.randn(1, 96)
    codes, scales = layer.qweight, layer.scales_and_mins
    for bad_codes, bad_scales, out in [(codes.to(torch.int32), scales, 64), (codes, scales.half(), 64),
                                       (codes[:32], scales, 64), (codes, scales[:, :, :2].contiguous(), 64),
                                       (codes, scales, 128), (codes.t(), scales, 64)]:
        with pytest.raises(native.NativeKernelError, match="not its layout"):
            kernels.q4_1_matmul(x, bad_codes, bad_scales, out)
    with pytest.raises(native.NativeKernelError, match="not its layout"):
        kernels.q8_0_matmul(x, codes, scales, 64)  # Q4_1 codes are not Q8_0 ones
    assert kernels.q4_1_matmul(torch.randn(0, 96), codes, scales, 64).shape == (0, 64)  # no rows: nothing called
    assert layer(torch.randn(2, 0, 96)).shape == (2, 0, 64)


def test_where_the_exact_kernel_is_not_had_auto_mode_keeps_chat_on_the_fp32_weights(tiny_model_dir, tmp_path,
                                                                                     monkeypatch):
    import dataclasses

    loaded = load_base_model(str(tiny_model_dir), tmp_path, resolve_device("cpu"))
    loaded.source = dataclasses.replace(loaded.source, kind="gguf")  # as if converted from a GGUF file
    native.load_kernels.cache_clear()
    monkeypatch.setenv("ENGRAM_NATIVE", "0")  # as on a machine without a C compiler
    assert not use_int4(loaded, exact_only=True) and loaded.weights == "dense"
    assert all(type(m) is not Int4Linear for m in loaded.model.modules())
    native.load_kernels.cache_clear()


def test_the_kernel_is_built_once_into_its_folder_and_reused_by_the_next_start(kernels, tmp_path):
    native.load_kernels.cache_clear()  # a new process, as far as the memo knows
    again = native.load_kernels(kernels.path.parent)
    assert again is not None and again.path == kernels.path
    assert [p.name for p in kernels.path.parent.iterdir()] == [kernels.path.name]  # no second build, no temp file


def test_a_q8_0_output_layer_with_rescoring_gives_the_exact_fp32_logits_of_its_best_tokens():
    raw = quants.quantize(random_weight(304, 64, seed=3), GGMLQuantizationType.Q8_0)
    weight = torch.from_numpy(quants.dequantize(raw, GGMLQuantizationType.Q8_0))
    layer = RescoredLogits(Int4Linear(unpack_q8_0_as_q4(raw), input_copies=2), weight, top=8)
    x = torch.randn(4, 64)
    logits, reference = layer(x), x @ weight.T
    best = reference.topk(4, dim=-1).indices  # well inside the 8 re-scored (the 8th may be another token)
    torch.testing.assert_close(logits.gather(1, best), reference.gather(1, best), rtol=1e-6, atol=1e-6)
    assert torch.equal(logits.argmax(-1), reference.argmax(-1))
    torch.testing.assert_close(logits, reference, rtol=2e-2, atol=2e-2)


# --- a model ------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def twins():
    """(fp32 model whose weights are exactly what their Q4_1 blocks stand for, its blocks)."""
    tokenizer = tiny_tokenizer()
    model = tiny_llama(len(tokenizer), seed=3)
    found: dict[str, LayerBlocks] = {}
    with torch.no_grad():
        for name, module in model.named_modules():
            if isinstance(module, torch.nn.Linear) and ".layers." in name:
                blocks = quantize_q4_1(module.weight)
                module.weight.copy_(blocks.dequantize())
                found[name] = LayerBlocks(blocks)
    return model, found, tokenizer


@pytest.fixture(scope="module")
def kernels(tmp_path_factory):
    """The C kernel, built for this machine (the test machines have a C compiler)."""
    native.load_kernels.cache_clear()
    built = native.load_kernels(tmp_path_factory.mktemp("kernels"))
    assert built is not None, "no C compiler found: install gcc or clang"
    assert built.threaded  # gcc with OpenMP, as on the test machines
    return built


def quantised(twins, compute_dtype=torch.float32, kernels=None):
    model, found, _ = twins
    copy_ = copy.deepcopy(model)
    report = quantize_model(copy_, found, compute_dtype, kernels=kernels)
    assert len(report.quantized) == 14 and report.bytes_after < report.bytes_before / 3
    return copy_


def greedy(model, steps: int = 12) -> list[int]:
    with torch.inference_mode():
        out = model.generate(torch.tensor(PROMPT), max_new_tokens=steps, min_new_tokens=steps, do_sample=False,
                             pad_token_id=0)
    return out[0, len(PROMPT[0]):].tolist()


@pytest.mark.parametrize("kernel", ["native", "torch-float32"])
def test_a_tiny_llama_on_int4_layers_generates_the_greedy_tokens_of_its_dequantised_fp32_twin(twins, kernels, kernel):
    model = twins[0]
    int4 = quantised(twins, kernels=kernels if kernel == "native" else None)
    layers = [m for n, m in int4.named_modules() if ".layers." in n and isinstance(m, torch.nn.Linear)]
    assert layers and all(isinstance(m, Int4Linear) and m.backend == kernel for m in layers)
    assert greedy(int4) == greedy(model)
    torch.testing.assert_close(decode_logits(int4, PROMPT[0]), decode_logits(model, PROMPT[0]), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("use_conv", [True, False])
def test_the_memorys_c_step_gives_the_pytorch_blocks_outputs_to_fp32_rounding(kernels, use_conv):
    """memory_step.c against EngramBlock's own code, for every length of convolution state (none, shorter
    than the kernel reaches, exactly, longer), and after a weight moves to new memory."""
    torch.manual_seed(0)
    block = EngramBlock(96, 64, kernel_size=4, dilation=3, use_conv=use_conv).eval()
    with torch.no_grad():  # every weight away from its initial value (W_V and the convolution start at 0)
        for param in block.parameters():
            param.copy_(torch.randn_like(param) * (0.3 if param.dim() > 1 else 0.1) + (param.dim() == 1))
    compared = 0
    for length in (0, 1, 5, 9, 12):
        hidden, memory = torch.randn(1, 1, 96), torch.randn(1, 1, 64)
        state = torch.randn(1, length, 96) if length else None
        with torch.inference_mode():
            use_native_step(None)
            expected = block(hidden, memory, None, state, with_ratio=True)
            use_native_step(kernels)
            calls = []
            step = kernels.memory_step
            object.__setattr__(kernels, "memory_step", lambda *a: calls.append(1) or step(*a))
            try:
                got = block(hidden, memory, None, state, with_ratio=True)
            finally:
                object.__delattr__(kernels, "memory_step")
        assert calls == [1]
        for field in ("y", "conv_input", "gate", "score", "ratio"):
            want, have = getattr(expected, field), getattr(got, field)
            if want is None:
                assert have is None and field == "conv_input" and not use_conv
                continue
            assert have.shape == want.shape
            torch.testing.assert_close(have, want, rtol=1e-5, atol=1e-5)
            compared += 1
        assert (got.y - hidden).abs().max() > 0.1  # a step that does something
    assert compared == (25 if use_conv else 20)
    with torch.no_grad():  # a weight replaced by new memory: the step reads the new one
        block.value.weight.data = block.value.weight.data * 2
    hidden, memory = torch.randn(1, 1, 96), torch.randn(1, 1, 64)
    with torch.inference_mode():
        use_native_step(None)
        expected = block(hidden, memory, None, None).y
        use_native_step(kernels)
        torch.testing.assert_close(block(hidden, memory, None, None).y, expected, rtol=1e-5, atol=1e-5)


def test_decoding_through_the_memorys_c_step_gives_the_logits_of_the_pytorch_step_and_of_the_whole_text(twins,
                                                                                                         kernels):
    """A tiny Llama with a memory that acts (rows, values and convolution away from zero), decoded one token at a
    time by the lean step with the C step, the PyTorch step, and read in one forward."""
    model, _, tokenizer = twins
    model = copy.deepcopy(model)
    memory = attach_engram(model, tokenizer, EngramConfig(layers=[1], heads=2, rows_per_head=1009, head_dim=8))
    generator = torch.Generator().manual_seed(2)
    with torch.no_grad():
        for param in memory.blocks.parameters():
            param.copy_(torch.randn(param.shape, generator=generator) * 0.3 + (param.dim() == 1))
        memory.table.weight.copy_(torch.randn(memory.table.weight.shape, generator=generator))
    ids = [1, *range(40, 70)]
    with torch.inference_mode():
        whole = model(torch.tensor([ids])).logits[0]
        with memory.disabled():
            base = model(torch.tensor([ids])).logits[0]
    use_native_step(None)
    torch_step = decode_logits(model, ids)
    use_native_step(kernels)
    calls = []
    step = kernels.memory_step
    object.__setattr__(kernels, "memory_step", lambda *a: calls.append(1) or step(*a))
    try:
        c_step = decode_logits(model, ids)
    finally:
        object.__delattr__(kernels, "memory_step")
    assert len(calls) == len(ids)  # every token (decode_logits reads the first one alone too)
    assert (whole - base).abs().max() > 0.1  # the memory acts
    torch.testing.assert_close(c_step, torch_step, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(c_step, whole, rtol=1e-4, atol=1e-4)


def test_the_int4_model_keeps_the_fingerprint_of_the_fp32_weights_it_was_built_from(twins):
    assert model_fingerprint(quantised(twins)) == model_fingerprint(twins[0])


def test_a_memory_trained_on_the_fp32_model_loads_onto_the_int4_model_and_gives_the_same_outputs(twins, tmp_path,
                                                                                                  kernels):
    model, _, tokenizer = twins
    peft = get_peft_model(copy.deepcopy(model), EngramConfig(tokenizer=tokenizer, layers=[1], heads=2,
                                                             rows_per_head=1009, head_dim=8))
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():  # a memory of its own, as training leaves it (a fresh one is the identity)
        memory = peft.base_model.memory("default")
        for block in memory.blocks.values():
            block.value.weight.copy_(torch.randn(block.value.weight.shape, generator=generator) * 0.5)
        memory.table.weight.copy_(torch.randn(memory.table.weight.shape, generator=generator))
    peft.save_pretrained(tmp_path / "memory")
    base_int4 = quantised(twins, kernels=kernels)
    with torch.inference_mode():
        off = base_int4(torch.tensor(PROMPT)).logits.clone()
    on_int4 = PeftModel.from_pretrained(base_int4, tmp_path / "memory")  # checks the fingerprint
    with torch.inference_mode():
        on = on_int4(torch.tensor(PROMPT)).logits
        expected = peft(torch.tensor(PROMPT)).logits
    assert (on - off).abs().max() > 0.1  # the memory acts on the int4 model ...
    torch.testing.assert_close(on, expected, rtol=1e-4, atol=1e-4)  # ... as it did on the fp32 one
    torch.testing.assert_close(decode_logits(on_int4, PROMPT[0]), decode_logits(peft, PROMPT[0]), rtol=1e-4, atol=1e-4)
    assert greedy(on_int4) == greedy(peft)


def test_a_lora_adapter_wraps_the_int4_layers_and_adds_its_update_to_theirs(twins, kernels):
    model = twins[0]
    config = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], init_lora_weights=False)
    torch.manual_seed(5)
    lora_fp32 = get_peft_model(copy.deepcopy(model), config)
    lora_int4 = get_peft_model(quantised(twins, kernels=kernels), config)
    lora_int4.load_state_dict(lora_fp32.state_dict(), strict=False)
    with torch.inference_mode():
        expected = lora_fp32(torch.tensor(PROMPT)).logits
        got = lora_int4(torch.tensor(PROMPT)).logits
        assert (expected - model(torch.tensor(PROMPT)).logits).abs().max() > 1e-3
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(decode_logits(lora_int4, PROMPT[0]), decode_logits(lora_fp32, PROMPT[0]),
                               rtol=1e-4, atol=1e-4)


def test_the_lean_step_runs_q_k_v_and_gate_up_as_one_kernel_call_each_from_the_layers_own_bytes(twins, kernels,
                                                                                                 monkeypatch):
    int4 = quantised(twins, kernels=kernels)
    decoder = lean_decoder(int4)
    attention, codes = int4.model.layers[0].self_attn, decoder.blocks[0].qkv.codes
    assert codes.shape[0] == attention.q_proj.out_features + 2 * attention.k_proj.out_features
    assert attention.q_proj.qweight.data_ptr() == codes.data_ptr()  # row slices of one buffer: no second copy
    assert attention.k_proj.qweight.data_ptr() == codes[attention.q_proj.out_features].data_ptr()
    calls = []
    original = native.Kernels.q4_1_matmul
    monkeypatch.setattr(native.Kernels, "q4_1_matmul", lambda self, *args: calls.append(1) or original(self, *args))
    got = decode_logits(int4, PROMPT[0])
    layers, steps = int4.config.num_hidden_layers, len(PROMPT[0]) - 1
    assert len(calls) == 7 * layers + 4 * layers * steps  # the first token by the model's forward, then lean steps
    torch.testing.assert_close(got, decode_logits(int4, PROMPT[0], lean=False), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(got, decode_logits(twins[0], PROMPT[0], lean=False), rtol=1e-4, atol=1e-4)


def test_layers_wrapped_by_lora_before_the_first_reply_are_still_fused_for_the_base_model(twins, kernels):
    int4 = quantised(twins, kernels=kernels)
    config = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], init_lora_weights=False)
    torch.manual_seed(5)
    wrapped = get_peft_model(int4, config)  # a LoRA pack loaded on the shared model before any reply
    base = wrapped.get_base_model()
    decoder = lean_decoder(base)
    assert decoder.blocks[0].qkv.codes is not None  # the q/k/v fusion looked through the LoRA layers
    torch.testing.assert_close(decode_logits(base, PROMPT[0]), decode_logits(base, PROMPT[0], lean=False),
                               rtol=1e-5, atol=1e-5)  # LoRA on: the wrappers are called, with their update
    plain = wrapped.unload()  # the pack unloaded: the base layers again, now one fused call
    assert lean_decoder(plain) is decoder and decoder.blocks[0].qkv._intact()
    torch.testing.assert_close(decode_logits(plain, PROMPT[0]), decode_logits(twins[0], PROMPT[0], lean=False),
                               rtol=1e-4, atol=1e-4)


def test_the_bf16_int4_model_stays_within_bf16_rounding_of_its_fp32_twin_and_reads_prompts_exactly(twins):
    fast = quantised(twins, compute_dtype=torch.bfloat16)
    got, expected = decode_logits(fast, PROMPT[0]), decode_logits(twins[0], PROMPT[0])
    assert 0 < (got - expected).abs().max() < 0.05 * expected.abs().max()
    with torch.inference_mode():  # the whole prompt in one forward: the layers' fp32 weights
        torch.testing.assert_close(fast(torch.tensor(PROMPT)).logits, twins[0](torch.tensor(PROMPT)).logits)


def test_prompts_read_fp32_weights_mapped_from_the_models_file_not_copies_held_in_memory(twins, tmp_path):
    from safetensors.torch import save_file

    model, found, _ = twins
    path = tmp_path / "model.safetensors"
    save_file({k: v.contiguous() for k, v in model.state_dict().items() if k != "lm_head.weight"}, str(path))
    dense = mapped_weights(path, list(found))
    assert set(dense) == set(found)
    copy_ = copy.deepcopy(model)
    report = quantize_model(copy_, found, kernels=None, dense=dense)
    assert report.dense_mapped == 14
    assert all(copy_.get_submodule(name).dense is dense[name] for name in found)
    assert str(path) in Path("/proc/self/maps").read_text()  # mapped, not read into memory
    with torch.inference_mode():
        torch.testing.assert_close(copy_(torch.tensor(PROMPT)).logits, model(torch.tensor(PROMPT)).logits)


def test_only_a_model_converted_from_gguf_is_put_on_int4_layers(tiny_model_dir, tmp_path):
    loaded = load_base_model(str(tiny_model_dir), tmp_path, resolve_device("cpu"), int4=True)
    assert loaded.weights == "dense" and not use_int4(loaded)
    assert all(type(m) is not Int4Linear for m in loaded.model.modules())


# --- the bundled model (slow) -------------------------------------------------------------------


@pytest.mark.slow
def test_the_bundled_model_on_its_own_4_bit_blocks_decodes_the_fp32_models_tokens(bundled_home, monkeypatch):
    """The default chat runtime (the exact C kernel, the lean step), one token at a time, against the fp32
    model's own forward."""
    from engram_app.inference import GenerationOptions, Message, Runtime

    root = Path(__file__).resolve().parent.parent
    fp32 = load_base_model(None, bundled_home / "models", resolve_device("cpu"))
    int4 = load_base_model(None, bundled_home / "models", resolve_device("cpu"), int4=True)
    assert int4.weights == "int4" and (bundled_home / "models" / fp32.source.name / "int4_layers.safetensors").is_file()
    layers = [m for m in int4.model.modules() if isinstance(m, Int4Linear)]
    assert len(layers) == 211 and {m.backend for m in layers} == {"native"}  # 30 x 7 + the output layer
    assert EngramBlock.native is not None  # and a memory's decoding steps run in C too (memory_step.c)
    texts = [p.read_text() for p in sorted((root / "assets/examples").iterdir()) if p.suffix in (".md", ".json")]
    agree = total = 0
    for text in texts[:3]:
        ids = fp32.tokenizer.encode(text)[:100]
        with torch.inference_mode():
            expected = fp32.model(torch.tensor([ids])).logits[0].argmax(-1)
        agree += int((decode_logits(int4.model, ids).argmax(-1) == expected).sum())
        total += len(ids)
    assert total == 300 and agree == total  # the bf16 kernel: ~99.2%; the C kernel is exact to fp32 rounding
    replies = []
    for loaded, lean in ((fp32, "0"), (int4, "1")):
        monkeypatch.setenv("ENGRAM_LEAN", lean)
        runtime = Runtime(loaded)
        runtime.stop_ids = set()
        ids = runtime.chat_ids([Message("user", "Tell me about the history of Paris.")])
        replies.append([t.id for t in runtime.stream_ids(ids, GenerationOptions(max_new_tokens=40))])
    assert len(replies[0]) == 40 and replies[0] == replies[1]
