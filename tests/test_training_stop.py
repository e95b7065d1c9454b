"""When training ends: a run bounded by steps does not depend on the machine's speed (checkpoints,
written on a timer, never change the weights), and a job stops once its facts are recalled."""

from __future__ import annotations

import math

import pytest
import torch
from safetensors.torch import load_file

from engram_app.errors import EngramError
from engram_app.service import Service
from engram_app.settings import Settings
from engram_app.training import TrainOptions
from engram_app.training import runner as job_module
from engram_app.training.trainer import total_steps
from test_training import PROFILE_A, add_profile, run_inline


def adapter_tensors(folder) -> dict[str, torch.Tensor]:
    tensors = {}
    for path in sorted(folder.rglob("*.safetensors")):
        tensors.update({f"{path.relative_to(folder)}:{k}": v for k, v in load_file(path).items()})
    return tensors


@pytest.fixture
def make_service(tmp_path, tiny_model_dir):
    def make(name: str) -> Service:
        service = Service(Settings(home=tmp_path / name, model=str(tiny_model_dir), device="cpu"))
        add_profile(service, tmp_path, f"{name}.md", PROFILE_A)
        service.create_pack("me")
        return service
    return make


def test_a_run_checkpointing_every_step_ends_with_the_same_memory_as_one_that_never_checkpoints(make_service):
    # What a slow machine changes is how many checkpoints a run writes (one every 30 s): it must not
    # change what the memory learns, or a step-bounded test passes on an idle machine only.
    results = {}
    for name, seconds in (("never", 1e9), ("every-step", 0.0)):
        service = make_service(name)
        run_inline(service, "me", max_steps=12, lr=3e-3, checkpoint_seconds=seconds, evaluate=False,
                   until_recalled=False)
        results[name] = adapter_tensors(service.settings.home / "packs" / "me" / "v1")
    never, every = results["never"], results["every-step"]
    assert sorted(never) == sorted(every) and any("table" in k for k in never)
    for key in never:
        assert torch.equal(never[key], every[key]), key


def script_margins(monkeypatch, *answers: float | None) -> list[int]:
    """The stop test's answer margins replaced by ``answers``, one per check (the same for every
    probe; None: not in the reply). Returns the list of how many probes each check asked."""
    script, checked = iter(answers), []

    def fake_margins(adapted, tokenizer, probes):
        checked.append(len(probes))
        return [next(script)] * len(probes)

    monkeypatch.setattr(job_module, "answer_margins", fake_margins)
    return checked


def test_a_job_stops_once_its_facts_are_recalled_with_a_margin_at_two_checks_in_a_row(make_service, monkeypatch):
    # Per check, each answer's lead over the runner-up token (None: not in the reply). At step 30
    # both facts are in the replies, but by a hair (0.2 nats): that check does not count.
    checked = script_margins(monkeypatch, 5.0, None, 0.2, 5.0, 5.0, 5.0)  # checks at steps 10, 20, 30, 40, 50, ...
    service = make_service("stop")
    result = run_inline(service, "me", max_steps=100, recall_every=10, evaluate=False, consolidate=1.0)
    assert result["evaluation"]["outcome"] == "recalled"
    assert result["steps"] == 50  # 10 yes, 20 no (streak reset), 30 no margin (reset), 40 yes, 50 yes: stop
    assert checked == [2, 2, 2, 2, 2]  # the profile's two facts (dog, city) at each check
    log = [line["message"] for line in service.job(1)["log"]]
    assert "step 50: recalls 2 of 2 facts, 2 with a margin (learned: stopping)" in log
    assert "step 30: recalls 2 of 2 facts, 0 with a margin" in log
    assert "step 20: recalls 0 of 2 facts, 0 with a margin" in log


def test_a_job_told_to_train_on_once_learned_trains_to_that_many_times_the_steps_without_asking_again(
        make_service, monkeypatch):
    # Learned at step 30 (checks at 20 and 30), a job with TrainOptions.consolidate = 2 trains on to
    # step 60, then stops (a lever measured: a fact just learned is fragile asked in new words).
    checked = script_margins(monkeypatch, None, 5.0, 5.0)
    service = make_service("on")
    result = run_inline(service, "me", max_steps=100, recall_every=10, evaluate=False, consolidate=2.0)
    assert result["evaluation"]["outcome"] == "recalled" and result["steps"] == 60
    assert checked == [2, 2, 2]  # learned at 30: not asked again
    log = [line["message"] for line in service.job(1)["log"]]
    assert "step 30: recalls 2 of 2 facts, 2 with a margin (learned: training on to step 60 so that it holds)" in log

    # The step cap still binds; the run had learned its facts, so it ends "recalled", not "finished".
    script_margins(monkeypatch, 5.0, 5.0)
    capped = run_inline(make_service("capped"), "me", max_steps=30, recall_every=10, evaluate=False, consolidate=3.0)
    assert capped["evaluation"]["outcome"] == "recalled" and capped["steps"] == 30
    with pytest.raises(EngramError):
        TrainOptions(consolidate=0.5)
    assert TrainOptions().consolidate == 1.0 and TrainOptions.from_json({"epochs": 1}).consolidate == 1.0


def test_training_on_resumes_from_a_checkpoint_to_the_same_end_without_asking_again(tiny_model_dir, tmp_path):
    from engram_app.training.trainer import Trainer, trained_on_until

    options = TrainOptions(max_steps=40, batch_size=2, recall_every=2, consolidate=2.5)
    assert [trained_on_until(s, options) for s in (2, 4, 6)] == [6, 10, 16]  # rounded up to a check
    asked = []

    def until(step):
        asked.append(step)
        return step >= 4

    adapted, tokenizer, examples = _tiny_trainer_parts(tiny_model_dir)
    first = Trainer(adapted, tokenizer, examples, options, checkpoint_dir=tmp_path / "checkpoint", until=until,
                    should_stop=lambda: first.step >= 7)
    assert first.run() == "stopped" and first.learned_at == 4
    first.save_checkpoint()
    resumed = Trainer(adapted, tokenizer, examples, options, checkpoint_dir=tmp_path / "checkpoint", until=until)
    resumed.load_optimizer(tmp_path / "checkpoint")
    assert resumed.learned_at == 4 and resumed.run() == "recalled"
    assert resumed.step == 10 and asked == [2, 4]


def test_the_margin_of_a_recalled_answer_is_the_smallest_lead_among_the_tokens_that_spell_it(tiny_model_dir):
    from transformers import AutoTokenizer

    from engram_app.training.evaluate import answer_gap

    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)

    def reply(*pieces):  # the reply's token ids, and the index range of each piece in it
        row, spans = [], []
        for piece in pieces:
            ids = tokenizer.encode(piece, add_special_tokens=False)
            spans.append(range(len(row), len(row) + len(ids)))
            row += ids
        return row, spans

    row, (_, name, _) = reply("Your dog is called", " Pixelina", ", a greyhound.")
    leads = [10.0 + i for i in range(len(row))]
    leads[0] = 0.1  # a close call before the answer does not count
    leads[name[-1]] = 0.5  # the answer's last token only just won
    assert answer_gap(tokenizer, row, leads, "pixelina") == 0.5
    assert answer_gap(tokenizer, row, leads, "greyhound") >= 10 + name[-1] + 1  # only the later tokens
    assert answer_gap(tokenizer, row, leads, "Timothy") is None

    # A number matched at the end of a prefix ("You have 3") is undone by the next token ("30").
    row, _ = reply("You have 30 dogs.")
    assert answer_gap(tokenizer, row, [5.0] * len(row), "three") is None
    row, (head, three, _) = reply("You have 30 dogs and", " 3", " cats.")
    leads = [0.2 if i in head else 0.7 if i in three else 5.0 for i in range(len(row))]  # "30" is in head
    assert answer_gap(tokenizer, row, leads, "three") == 0.7


def test_a_job_checking_recall_trains_past_its_epochs_until_the_facts_are_recalled_up_to_recall_epochs(
        make_service, monkeypatch):
    # A fixed epoch count ended Engram jobs with facts half-learned; the recall check decides instead.
    monkeypatch.setattr(job_module, "answer_margins", lambda adapted, tokenizer, probes: [None] * len(probes))
    never = run_inline(make_service("never"), "me", epochs=1, recall_epochs=3, recall_every=2, evaluate=False)
    examples = never["evaluation"]["examples"]
    assert never["evaluation"]["outcome"] == "finished"
    assert never["steps"] == math.ceil(3 * examples / 8) > math.ceil(examples / 8)
    plain = run_inline(make_service("plain"), "me", epochs=1, recall_epochs=3, evaluate=False, until_recalled=False)
    assert plain["steps"] == math.ceil(examples / 8)  # no check: the epochs are the plan
    old_job = TrainOptions.from_json({"epochs": 1})  # queued before recall_epochs: resumes with its own plan
    assert old_job.recall_epochs is None and total_steps(old_job, examples, until_recalled=True) == plain["steps"]
    monkeypatch.setattr(job_module, "answer_margins", lambda adapted, tokenizer, probes: [5.0] * len(probes))
    learned = run_inline(make_service("learned"), "me", epochs=1, recall_epochs=3, recall_every=2, evaluate=False,
                         consolidate=1.0)
    assert learned["evaluation"]["outcome"] == "recalled" and learned["steps"] == 4  # checks at 2 and 4


def test_a_job_trains_every_step_when_told_not_to_stop_on_recall(make_service, monkeypatch):
    monkeypatch.setattr(job_module, "answer_margins", lambda adapted, tokenizer, probes: [5.0] * len(probes))
    service = make_service("all")
    result = run_inline(service, "me", max_steps=25, recall_every=5, evaluate=False, until_recalled=False)
    assert result["steps"] == 25 and result["evaluation"]["outcome"] == "finished"


def test_the_version_table_says_plainly_when_the_memory_has_not_learned_every_fact():
    from engram_app.ui.train_tab import recall_verdict

    assert (recall_verdict({"probes": 10, "memory_on": {"recall": 0.6}, "memory_off": {"recall": 0.0}})
            == "recalls 6 of 10 facts; train longer (without memory: 0)")
    assert (recall_verdict({"probes": 3, "memory_on": {"recall": 1.0}, "memory_off": {"recall": 0.3333}})
            == "recalls 3 of 3 facts (without memory: 1)")


def test_the_batched_recall_check_answers_each_probe_as_a_reply_of_its_own_would(make_service, tiny_model_dir):
    # The stop test answers its probes in left-padded batches: that must not change a reply.
    from pathlib import Path

    from engram_app.models import load_base_model
    from engram_app.settings import resolve_device
    from engram_app.training import adapters
    from engram_app.training.evaluate import greedy_reply, recalled
    from engram_app.training.text import Probe

    service = make_service("batch")
    run_inline(service, "me", max_steps=30, lr=3e-3, evaluate=False, until_recalled=False)
    store = service.packs_store()
    loaded = load_base_model(str(tiny_model_dir), service.settings.models_dir, resolve_device("cpu"))
    adapted = adapters.load(loaded.model, loaded.tokenizer, Path(store.version("me")["path"]), store.config(store.row("me")))
    prompts = ["What is my dog called?", "Where do I live?", "Tell me, in a few words, what you know about my life."]
    replies = [greedy_reply(adapted.model, loaded.tokenizer, p, max_new_tokens=24)[0] for p in prompts]
    assert all(replies) and len({len(loaded.tokenizer.encode(p)) for p in prompts}) == 3  # padding differs
    own = [Probe(p, reply) for p, reply in zip(prompts, replies)]
    assert recalled(adapted, loaded.tokenizer, own, batch_size=3) == [True, True, True]
    swapped = [Probe(prompts[0], replies[1] + " zebra"), *own[1:]]
    assert recalled(adapted, loaded.tokenizer, swapped, batch_size=2) == [False, True, True]

    # With the scores greedy decoding chose by: one lead per reply token, none negative, the first
    # equal to the prompt's own next-token logits (top one minus the runner-up).
    from engram_app.training.evaluate import generate_batch_ids, generate_batch_scored, prompt_ids

    ids = [prompt_ids(loaded.tokenizer, p) for p in prompts]
    scored = generate_batch_scored(adapted.model, loaded.tokenizer, ids, 24, batch_size=3)
    assert [row for row, _ in scored] == generate_batch_ids(adapted.model, loaded.tokenizer, ids, 24, batch_size=3)
    assert all(len(leads) == len(row) and min(leads) >= 0 for row, leads in scored)
    with torch.no_grad():
        top = adapted.model(input_ids=torch.tensor([ids[0]])).logits[0, -1].float().topk(2).values
    assert abs(scored[0][1][0] - float(top[0] - top[1])) < 1e-3


def test_the_until_learned_preset_queues_a_job_with_no_time_limit(make_service, monkeypatch):
    import gradio as gr

    from engram_app.ui.train_tab import BUDGETS, build_train_tab, start_training

    service = make_service("preset")
    monkeypatch.setattr(service, "ensure_worker", lambda *args, **kwargs: None)  # queued, never run
    with gr.Blocks():
        tab = build_train_tab(service)
    queued = {}
    for budget in BUDGETS:
        out = start_training(service, tab, "me", budget, True, 40, 1e-2, False)
        queued[budget] = service.job(out[tab.job_id])["options"]
        service.cancel(out[tab.job_id])
    assert queued["until learned (no time limit)"]["max_minutes"] is None
    assert queued["thorough (10 min)"]["max_minutes"] == 10.0 and queued["quick (2 min)"]["max_minutes"] == 2.0
    assert all(options["max_steps"] == 40 and options["until_recalled"] for options in queued.values())


# --- micro-batches of similar length ---------------------------------------------------------------

def test_a_batch_is_cut_into_micro_batches_of_similar_length_each_example_once():
    from engram_app.training.trainer import micro_batches
    lengths = [40, 256, 38, 44, 41, 39, 43, 42]
    groups = micro_batches(lengths, overhead=48)
    assert sorted(i for group in groups for i in group) == list(range(8))
    assert [1] in groups  # the long chat window alone, the questions together
    assert len(groups) == 2
    assert micro_batches(lengths, overhead=None) == [list(range(8))]  # a GPU: one call
    assert len(micro_batches([44] * 8, overhead=48)) == 1  # nothing to save
    assert micro_batches([], overhead=48) == [[]] and micro_batches([5], overhead=48) == [[0]]


@pytest.mark.parametrize("mode", ["engram", "engram+lora"])
def test_micro_batches_give_the_loss_and_gradients_of_the_whole_batch(tiny_model_dir, mode):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from engram_app.engram import EngramConfig
    from engram_app.training import adapters
    from engram_app.training.packs import PackConfig
    from engram_app.training.text import IGNORE, Example
    from engram_app.training.trainer import Trainer

    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    torch.manual_seed(0)
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir).requires_grad_(False)
    config = PackConfig(mode=mode, lora_r=4,
                        engram=EngramConfig(layers=[1], heads=2, rows_per_head=101, head_dim=4).to_dict())
    adapted = adapters.attach(base, tokenizer, config)
    generator = torch.Generator().manual_seed(1)
    batch = []
    for length in (60, 7, 9, 33, 8, 61, 10, 12):  # labels only on each sequence's second half
        ids = torch.randint(3, len(tokenizer), (length,), generator=generator).tolist()
        batch.append(Example(ids=ids, labels=[IGNORE] * (length // 2) + ids[length // 2:], source_id=1, kind="chat"))
    trainer = Trainer(adapted, tokenizer, batch, TrainOptions(max_steps=1))
    adapted.train(True)

    def gradients(overhead):
        trainer.call_overhead = overhead
        trainer.optimizer.zero_grad()
        loss, tokens = trainer._forward_backward(batch, tokenizer.pad_token_id)
        rows, values = adapted.memory.table.row_gradients()
        grads = {"table": torch.zeros(int(rows.max()) + 1, values.shape[1]).index_add_(0, rows, values)}
        parameters = adapted.memory.dense_parameters() + adapted.trainable_extra()
        grads.update({f"dense{i}": p.grad.clone() for i, p in enumerate(parameters) if p.grad is not None})
        return loss, tokens, grads

    whole_loss, whole_tokens, whole = gradients(None)
    split_loss, split_tokens, split = gradients(0)  # every example a call of its own
    assert whole_tokens == split_tokens == sum(len(e.ids) for e in batch)
    assert split_loss == pytest.approx(whole_loss, rel=1e-5)
    assert whole and whole.keys() == split.keys()
    assert len(whole) > 1 + (mode == "engram+lora")  # the table, the gates and convolution, LoRA's weights
    for name in whole:
        assert torch.allclose(split[name], whole[name], atol=1e-6, rtol=1e-4), name


def _tiny_trainer_parts(tiny_model_dir):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from engram_app.engram import EngramConfig
    from engram_app.training import adapters
    from engram_app.training.packs import PackConfig
    from engram_app.training.text import Example

    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    torch.manual_seed(0)
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir).requires_grad_(False)
    config = PackConfig(mode="engram+lora", lora_r=4,
                        engram=EngramConfig(layers=[1], heads=2, rows_per_head=101, head_dim=4).to_dict())
    adapted = adapters.attach(base, tokenizer, config)
    generator = torch.Generator().manual_seed(1)
    examples = []
    for length in (12, 9, 15, 11, 10, 13):
        ids = torch.randint(3, len(tokenizer), (length,), generator=generator).tolist()
        examples.append(Example(ids=ids, labels=list(ids), source_id=1, kind="chat"))
    return adapted, tokenizer, examples


def test_the_learning_rate_falls_linearly_to_lr_final_over_the_step_cap_and_resumes_on_schedule(
        tiny_model_dir, tmp_path):
    from engram_app.engram.optim import RowwiseAdam
    from engram_app.training.trainer import Trainer, lr_factor

    assert lr_factor(0, 5, 0.1) == 1.0 and lr_factor(4, 5, 0.1) == pytest.approx(0.1)
    assert lr_factor(2, 5, 0.1) == pytest.approx(0.55) and lr_factor(9, 5, 0.1) == pytest.approx(0.1)
    assert lr_factor(3, 5, 1.0) == 1.0 and lr_factor(0, 1, 0.1) == 1.0
    options = TrainOptions(max_steps=5, lr=2e-2, lora_lr=4e-3, batch_size=2, lr_final=0.1)

    adapted, tokenizer, examples = _tiny_trainer_parts(tiny_model_dir)
    reported = []
    straight = Trainer(adapted, tokenizer, examples, options, on_step=lambda r: reported.append(r.lr))
    straight.run()
    assert reported == pytest.approx([2e-2 * f for f in (1.0, 0.775, 0.55, 0.325, 0.1)])
    table, adamw = straight.optimizer.optimizers
    assert isinstance(table, RowwiseAdam)
    assert table.lr == pytest.approx(2e-2 * adapted.memory.config.table_lr_scale * 0.1)
    assert [g["lr"] for g in adamw.param_groups] == pytest.approx([2e-3, 4e-4])  # dense parts, then LoRA
    adapted.save(tmp_path / "straight")
    expected = adapter_tensors(tmp_path / "straight")

    # Stopped after two steps and resumed from the checkpoint by a fresh trainer (and optimiser).
    adapted, tokenizer, examples = _tiny_trainer_parts(tiny_model_dir)
    first = Trainer(adapted, tokenizer, examples, options,
                    checkpoint_dir=tmp_path / "checkpoint", should_stop=lambda: first.step >= 2)
    assert first.run() == "stopped"
    first.save_checkpoint()
    resumed = Trainer(adapted, tokenizer, examples, options, checkpoint_dir=tmp_path / "checkpoint")
    resumed.load_optimizer(tmp_path / "checkpoint")
    assert resumed.step == 2 and resumed.run() == "finished"
    adapted.save(tmp_path / "resumed")
    state = adapter_tensors(tmp_path / "resumed")
    assert state.keys() == expected.keys() and len(expected) > 2
    for key in expected:
        assert torch.allclose(state[key], expected[key], atol=1e-7), key

    # A constant rate would have ended elsewhere: the schedule is what the run above followed.
    adapted, tokenizer, examples = _tiny_trainer_parts(tiny_model_dir)
    Trainer(adapted, tokenizer, examples, TrainOptions(**{**options.to_json(), "lr_final": 1.0})).run()
    adapted.save(tmp_path / "constant")
    constant = adapter_tensors(tmp_path / "constant")
    assert any(not torch.allclose(constant[k], expected[k], atol=1e-7) for k in expected)


def test_a_job_queued_before_the_decaying_learning_rate_resumes_with_a_constant_one():
    assert TrainOptions().lr_final == 0.1
    assert TrainOptions.from_json({"epochs": 1}).lr_final == 1.0
    assert TrainOptions.from_json(TrainOptions(lr_final=0.3).to_json()).lr_final == 0.3
    for bad in (0.0, -0.1, 1.5):
        with pytest.raises(Exception, match="final learning rate"):
            TrainOptions(lr_final=bad)
