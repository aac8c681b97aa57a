"""The training loop and evaluation on tiny models: schedule, precision, callbacks, perplexity."""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch
from transformers import AutoModelForCausalLM

from kdsweep.data import Batch, make_batches
from kdsweep.distill import lora, models, preemption, train
from kdsweep.distill import on_policy as on_policy_module
from kdsweep.distill.evaluate import prepare_eval_set, score
from kdsweep.distill.loss import DistillSettings, batch_loss
from kdsweep.distill.models import (
    Vocabulary,
    checkpoint_activations,
    hidden_states,
    shared_vocabulary,
)
from kdsweep.distill.preemption import Preempted
from kdsweep.distill.targets import OnlineTeacher
from kdsweep.distill.train import StepLog
from kdsweep.errors import UsageError
from kdsweep.study.config import LoraConfig, TrainConfig

from conftest import Recorded


@pytest.fixture(scope="module")
def setup(tiny_setup):
    return tiny_setup


def settings(**overrides):
    # select "last": the test's evaluation measures its own "nll", no objective of a study
    cfg = dict(
        max_steps=6,
        batch_size=8,
        eval_every=3,
        log_every=2,
        warmup_ratio=0.0,
        device="cpu",
        select="last",
    )
    cfg.update(overrides.pop("train", {}))
    values = dict(
        alpha=0.5, temperature=2.0, top_k=None, learning_rate=1e-2, train=TrainConfig(**cfg)
    )
    values.update(overrides)
    return DistillSettings(**values)


def run(setup, tiny_models, run_settings, teacher=True, hooks=None, student=None):
    """A run of the tiny student (or of ``student``); returns its result, logs, evaluations and
    the student."""
    tokenizer, teacher_model, vocab, split = setup
    student = student or AutoModelForCausalLM.from_pretrained(tiny_models["student"])
    batches = make_batches(
        split, batch_size=16, pad_id=0, shuffle_seed=None, group_by_length=False
    )
    data = train.TrainingData(
        split,
        vocab,
        tokenizer.pad_token_id,
        lambda model, step: {"nll": score(model, batches, vocab).nll_sum},
    )
    hooks = hooks or Recorded()
    signal = OnlineTeacher(teacher_model, vocab) if teacher else None
    result = train.distill(student, run_settings, data, signal, hooks)
    return result, hooks.logs, hooks.evals, student


def test_distill_logs_evaluates_and_learns(setup, tiny_models):
    result, logs, evals, _ = run(
        setup, tiny_models, settings(learning_rate=3e-2, train={"max_steps": 12, "eval_every": 6})
    )
    assert [log.step for log in logs] == [2, 4, 6, 8, 10, 12]
    assert [step for step, _ in evals] == [6, 12]
    assert all(
        math.isfinite(log.loss) and log.kl >= 0 and log.ce > 0 and log.grad_norm > 0
        for log in logs
    )
    assert logs[0].loss == pytest.approx(0.5 * logs[0].kl + 0.5 * logs[0].ce, rel=1e-5)
    assert logs[-1].ce < logs[0].ce  # it learns
    assert result.steps == 12 and result.peak_memory_bytes > 0


def test_same_seed_same_run(setup, tiny_models):
    first = run(setup, tiny_models, settings())[1]
    second = run(setup, tiny_models, settings())[1]
    assert [log.loss for log in first] == [log.loss for log in second]


def test_a_preempted_run_resumed_from_its_checkpoint_ends_where_the_whole_run_does(
    setup, tiny_models
):
    # 12 steps cross an epoch of the data; stopping at 4 leaves a step in the log window
    resumed = settings(
        train={"max_steps": 12, "eval_every": 4, "log_every": 3, "checkpoint_every": 0}
    )
    whole, whole_logs, whole_evals, _ = run(setup, tiny_models, resumed)

    def stop_at_step_4(step, metrics):
        if step == 4:
            preemption.request(preemption.PREEMPTED)  # in the loop: waits for the step to end

    stopping = Recorded(on_eval=stop_at_step_4, checkpointing=True)
    try:
        with pytest.raises(Preempted) as stopped:
            run(setup, tiny_models, resumed, hooks=stopping)
    finally:
        preemption.reset()
    assert stopped.value.step == 4 and [state.step for state in stopping.states] == [4]
    after, logs, evals, _ = run(
        setup, tiny_models, resumed, hooks=Recorded(resume=stopping.states[0])
    )
    assert [log.step for log in logs] == [6, 9, 12]  # no step twice
    assert [log.loss for log in logs] == [log.loss for log in whole_logs[1:]]
    assert evals == whole_evals[1:]
    assert after.final_eval["nll"] == pytest.approx(whole.final_eval["nll"], rel=1e-6)
    assert after.best_step == whole.best_step


def test_checkpoints_are_written_at_each_evaluation_by_default(setup, tiny_models):
    hooks = Recorded(checkpointing=True)
    run(setup, tiny_models, settings(), hooks=hooks)
    assert [state.step for state in hooks.states] == [3]  # not at the last step: the trial is done
    assert [step for step, _ in hooks.states[0].evaluations] == [3]


def test_alpha_zero_needs_no_teacher(setup, tiny_models):
    _, logs, _, _ = run(setup, tiny_models, settings(alpha=0.0), teacher=False)
    assert all(log.kl == 0 and log.loss == pytest.approx(log.ce) for log in logs)


def test_top_k_distills_the_teachers_renormalised_top_entries(setup, tiny_models):
    """The first step's logged KL is T^2 KL(top-4 teacher renormalised || student) on its batch,
    computed here in float64 from the two models' full logits."""
    tokenizer, teacher_model, vocab, split = setup
    run_settings = settings(
        top_k=4, temperature=2.0, train={"log_every": 1, "max_steps": 1, "eval_every": 1}
    )
    batch = next(train.endless_batches(split, run_settings, pad_id=tokenizer.pad_token_id))
    student = AutoModelForCausalLM.from_pretrained(tiny_models["student"])
    with torch.no_grad():
        kept = batch.labels[:, 1:] != -100
        logits = {
            name: model(input_ids=batch.input_ids, attention_mask=batch.attention_mask)
            .logits[:, :-1][kept][:, : vocab.size]
            .double()
            for name, model in (("student", student), ("teacher", teacher_model))
        }
    top = logits["teacher"].topk(4, dim=-1)
    p_t = torch.softmax(top.values / 2.0, dim=-1)
    log_q = torch.log_softmax(logits["student"] / 2.0, dim=-1).gather(-1, top.indices)
    expected = 4.0 * (p_t * (p_t.log() - log_q)).sum(-1).mean()

    _, logs, _, _ = run(setup, tiny_models, run_settings)
    assert logs[0].kl == pytest.approx(float(expected), rel=1e-4)
    full = run(setup, tiny_models, dataclasses.replace(run_settings, top_k=None))[1]
    # truncation changes what is distilled
    assert full[0].kl != pytest.approx(logs[0].kl, rel=1e-3)


@pytest.mark.parametrize("beta", [1.0, 0.5])
def test_the_trials_beta_is_the_divergence_the_loop_minimizes(setup, tiny_models, beta):
    """The first step's logged KL is T^2 times the generalized JSD at the trial's beta (1: reverse
    KL), computed here in float64 from the two models' full logits."""
    tokenizer, teacher_model, vocab, split = setup
    run_settings = settings(
        beta=beta, temperature=2.0, train={"log_every": 1, "max_steps": 1, "eval_every": 1}
    )
    batch = next(train.endless_batches(split, run_settings, pad_id=tokenizer.pad_token_id))
    student = AutoModelForCausalLM.from_pretrained(tiny_models["student"])
    with torch.no_grad():
        kept = batch.labels[:, 1:] != -100
        log_q, log_p = (
            torch.log_softmax(
                model(input_ids=batch.input_ids, attention_mask=batch.attention_mask)
                .logits[:, :-1][kept][:, : vocab.size]
                .double()
                / 2.0,
                -1,
            )
            for model in (student, teacher_model)
        )

    def kl(log_a, log_b):
        return (log_a.exp() * (log_a - log_b)).sum(-1)

    if beta == 1.0:
        divergence = kl(log_q, log_p)
    else:
        log_m = torch.logsumexp(
            torch.stack([log_p + math.log(beta), log_q + math.log(1 - beta)]), dim=0
        )
        divergence = beta * kl(log_p, log_m) + (1 - beta) * kl(log_q, log_m)
    _, logs, _, _ = run(setup, tiny_models, run_settings)
    assert logs[0].kl == pytest.approx(4.0 * float(divergence.mean()), rel=1e-4)


def test_gradient_accumulation_counts_micro_batches(setup, tiny_models):
    _, logs, _, _ = run(
        setup, tiny_models, settings(train={"grad_accum_steps": 2, "batch_size": 4})
    )
    assert len(logs) == 3 and all(math.isfinite(log.loss) for log in logs)


ONE_BATCH = {"batch_size": 8, "grad_accum_steps": 1}
MICRO_BATCHES = {"batch_size": 2, "grad_accum_steps": 4}  # the same 8 rows, unshuffled by length


def first_step(setup, tiny_models, form: str, batching: dict) -> tuple[dict, StepLog]:
    """A one-step run of the tiny student in ``form``: its gradient before clipping (each
    parameter's after its last accumulation, by name) and its log."""
    values = {
        "plain fine-tuning": {"alpha": 0.0},
        "top-k": {"top_k": 4},
        "on-policy": {"lmbda": 1.0},
    }
    one_step = {"max_steps": 1, "eval_every": 1, "log_every": 1, **batching}
    run_settings = settings(train=one_step, group_by_length=False, **values.get(form, {}))
    student = AutoModelForCausalLM.from_pretrained(tiny_models["student"])
    if form == "LoRA":
        pytest.importorskip("peft")
        torch.manual_seed(0)  # the same adapter for every batching
        student = lora.adapt(student, 4, LoraConfig())
    gradient = {}
    for name, param in student.named_parameters():
        if param.requires_grad:
            param.register_post_accumulate_grad_hook(
                lambda p, name=name: gradient.__setitem__(name, p.grad.clone())
            )
    _, logs, _, _ = run(setup, tiny_models, run_settings, student=student)
    return gradient, logs[0]


def largest_difference(ours: dict, theirs: dict) -> float:
    """The largest difference between two gradients, relative to the largest entry."""
    scale = max(float(g.abs().max()) for g in theirs.values())
    return max(float((ours[name] - g).abs().max()) for name, g in theirs.items()) / scale


def completions_of_unequal_lengths(model, prompts, *, vocab_size, **kwargs):
    """The same completion of a prompt whatever the batch: 1 to 4 tokens, by its length."""
    return [[(sum(p) + i) % vocab_size for i in range(1 + len(p) % 4)] for p in prompts]


@pytest.mark.parametrize(
    "form", ["distillation", "top-k", "plain fine-tuning", "on-policy", "LoRA"]
)
def test_accumulated_micro_batches_give_the_gradient_of_one_batch(
    setup, tiny_models, form, monkeypatch
):
    """grad_accum_steps 4 of batch 2 trains on one batch of 8: the same gradient, the same logged
    loss, though its micro-batches score different numbers of tokens (their completions too)."""
    monkeypatch.setattr(on_policy_module, "generate", completions_of_unequal_lengths)
    tokenizer, _, _, split = setup
    stream = train.endless_batches(
        split, settings(train=MICRO_BATCHES, group_by_length=False), pad_id=0
    )
    micro_batches = [next(stream) for _ in range(4)]
    assert len({batch.num_scored_tokens for batch in micro_batches}) > 1
    one, one_log = first_step(setup, tiny_models, form, ONE_BATCH)
    accumulated, accumulated_log = first_step(setup, tiny_models, form, MICRO_BATCHES)
    assert largest_difference(accumulated, one) < 1e-5
    for term in ("loss", "kl", "ce"):
        assert getattr(accumulated_log, term) == pytest.approx(getattr(one_log, term), abs=1e-6)


def test_an_even_average_of_the_micro_batches_means_is_another_gradient(setup, tiny_models):
    """What accumulation did before it weighed micro-batches by their tokens: the test above
    tells the two apart."""
    _, teacher_model, vocab, split = setup
    one, _ = first_step(setup, tiny_models, "distillation", ONE_BATCH)
    run_settings = settings(train=MICRO_BATCHES, group_by_length=False)
    student = AutoModelForCausalLM.from_pretrained(tiny_models["student"])
    stream = train.endless_batches(split, run_settings, pad_id=0)
    for batch in [next(stream) for _ in range(4)]:
        targets = OnlineTeacher(teacher_model, vocab).targets(batch, top_k=None)
        (batch_loss(student, batch, targets, run_settings, vocab).loss / 4).backward()
    evenly = {name: p.grad for name, p in student.named_parameters()}
    assert largest_difference(evenly, one) > 1e-2


def test_the_fused_optimizer_steps_as_the_plain_one_does(tiny_models):
    """kdsweep's AdamW (torch's fused kernel) and torch's per-tensor loop take the same steps from
    the same gradients, to float rounding."""
    students = [AutoModelForCausalLM.from_pretrained(tiny_models["student"]) for _ in range(2)]
    start = [p.detach().clone() for p in students[0].parameters()]
    fused = train.adamw(students[0], settings(train={"weight_decay": 0.1}))
    plain = torch.optim.AdamW(students[1].parameters(), lr=1e-2, weight_decay=0.1, foreach=False)
    assert fused.defaults["fused"] and not plain.defaults["fused"]
    generator = torch.Generator().manual_seed(0)
    for _ in range(5):
        for ours, theirs in zip(*(s.parameters() for s in students)):
            ours.grad = torch.randn(ours.shape, generator=generator)
            theirs.grad = ours.grad.clone()
        fused.step()
        plain.step()
    pairs = list(zip(*(s.parameters() for s in students)))
    moved = max(float((ours - before).abs().max()) for (ours, _), before in zip(pairs, start))
    apart = max(float((ours - theirs).abs().max()) for ours, theirs in pairs)
    assert moved > 1e-2 and apart < 1e-6


def test_gradient_checkpointing_keeps_fewer_activations_for_the_same_gradient(setup, tiny_models):
    batch = next(train.endless_batches(setup[3], settings(), pad_id=0))

    def kept_for_backward(student) -> int:
        count = 0

        def pack(tensor):
            nonlocal count
            count += 1
            return tensor

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
            hidden_states(student, batch.input_ids, batch.attention_mask)
        return count

    student = AutoModelForCausalLM.from_pretrained(tiny_models["student"]).train()
    whole = kept_for_backward(student)
    checkpoint_activations(student)
    assert kept_for_backward(student) < whole / 4
    assert kept_for_backward(student.eval()) == whole  # evaluation computes as before

    plain, _ = first_step(setup, tiny_models, "distillation", ONE_BATCH)
    checkpointed, _ = first_step(
        setup, tiny_models, "distillation", {**ONE_BATCH, "gradient_checkpointing": True}
    )
    assert largest_difference(checkpointed, plain) < 1e-6


def test_a_hook_can_stop_the_run(setup, tiny_models):
    class Pruned(Exception):
        pass

    def stop(step, metrics):
        raise Pruned

    with pytest.raises(Pruned):
        run(setup, tiny_models, settings(alpha=0.0), teacher=False, hooks=Recorded(on_eval=stop))


def test_warmup_then_cosine():
    factor = train.warmup_then_cosine(100, 0.1)
    assert factor(0) == pytest.approx(0.1) and factor(9) == pytest.approx(1.0)
    assert factor(10) == pytest.approx(1.0) and factor(100) == pytest.approx(0.1)
    assert all(factor(s) >= factor(s + 1) for s in range(10, 100))
    assert train.warmup_then_cosine(10, 0.0)(0) == pytest.approx(1.0)


def test_mixed_precision_choices(monkeypatch):
    cpu = torch.device("cpu")
    monkeypatch.setattr(models, "cpu_has_amx", lambda: False)
    autocast, scaler = train.mixed_precision("auto", cpu)
    assert not scaler.is_enabled()
    with autocast():
        assert (torch.ones(2, 2) @ torch.ones(2, 2)).dtype == torch.float32  # a CPU without AMX
    assert models.resolve_dtype("auto", cpu, frozen=True) == torch.float32
    monkeypatch.setattr(models, "cpu_has_amx", lambda: True)  # where bf16 is fast
    autocast, scaler = train.mixed_precision("auto", cpu)
    with autocast():
        assert (torch.ones(2, 2) @ torch.ones(2, 2)).dtype == torch.bfloat16
    assert models.resolve_dtype("auto", cpu, frozen=True) == torch.bfloat16
    assert models.resolve_dtype("auto", cpu, frozen=False) == torch.float32  # master weights
    autocast, scaler = train.mixed_precision("bf16", cpu)
    with autocast():
        assert (torch.ones(2, 2) @ torch.ones(2, 2)).dtype == torch.bfloat16
    assert not scaler.is_enabled()  # bf16 needs no loss scaling


def test_perplexity_is_token_weighted():
    """Two rows of 1 and 3 scored tokens: exp(total NLL / 4), not the mean of per-row
    perplexities."""
    vocab = Vocabulary(size=5, teacher_rows=5, student_rows=5)

    class Fixed(torch.nn.Module):
        # Predicts the same distribution everywhere: p(token 1) = 0.5, p(token 2) = 0.125.
        def __init__(self):
            super().__init__()
            self.training = False
            self.out = torch.nn.Linear(1, 5, bias=False)
            with torch.no_grad():
                self.out.weight.copy_(
                    torch.log(torch.tensor([[0.125], [0.5], [0.125], [0.125], [0.125]]))
                )

        def get_decoder(self):
            return lambda input_ids, attention_mask, use_cache: type(
                "Out", (), {"last_hidden_state": torch.ones(*input_ids.shape, 1)}
            )

        def get_output_embeddings(self):
            return self.out

    batch = Batch(
        input_ids=torch.tensor([[3, 1, 0, 0], [3, 2, 2, 2]]),
        attention_mask=torch.tensor([[1, 1, 0, 0], [1, 1, 1, 1]]),
        labels=torch.tensor([[-100, 1, -100, -100], [-100, 2, 2, 2]]),
        example_ids=torch.tensor([0, 1]),
    )
    scores = score(Fixed(), [batch], vocab)
    assert scores.tokens == 4
    expected = math.exp((-math.log(0.5) - 3 * math.log(0.125)) / 4)
    assert scores.perplexity == pytest.approx(expected, rel=1e-6)


def test_teacher_eval_set_scores_teacher_on_the_same_tokens(setup):
    tokenizer, teacher_model, vocab, split = setup
    batches = make_batches(split, batch_size=8, pad_id=0, shuffle_seed=None, group_by_length=True)
    eval_set = prepare_eval_set(OnlineTeacher(teacher_model, vocab), batches, chunk_tokens=64)
    assert eval_set.num_tokens == split.num_scored_tokens
    assert eval_set.teacher_ppl == pytest.approx(score(teacher_model, batches, vocab).perplexity)
    assert (
        sum(len(t.logits if t.logits is not None else t.values) for t in eval_set.teacher_targets)
        == split.num_scored_tokens
    )


def test_vocabulary_padding_rows_are_allowed_but_not_fewer_rows(setup):
    tokenizer = setup[0]
    vocab = shared_vocabulary(tokenizer, len(tokenizer), len(tokenizer) + 64)
    assert vocab.size == len(tokenizer) and vocab.padded
    with pytest.raises(UsageError, match="share one tokenizer"):
        shared_vocabulary(tokenizer, len(tokenizer) - 1, len(tokenizer))
