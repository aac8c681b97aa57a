"""On-policy distillation: the student completes its rows' prompts, the teacher scores those
tokens online, the divergence sees only them, and a trial with lmbda > 0 is reproducible."""

from __future__ import annotations

import contextlib
import dataclasses

import pytest
import torch
from mlflow.tracking import MlflowClient
from transformers import AutoModelForCausalLM

from kdsweep.cli import main
from kdsweep.distill import models, train
from kdsweep.distill import on_policy as on_policy_module
from kdsweep.distill.loss import DistillSettings
from kdsweep.distill.on_policy import OnPolicy
from kdsweep.distill.targets import OnlineTeacher
from kdsweep.losses import IGNORE_INDEX, distill_loss_from_hidden
from kdsweep.names import Metric, Tag, TrialAttr
from kdsweep.prepare.trial_runner import TrialRunner
from kdsweep.progress import SweepProgress
from kdsweep.store.storage import load_existing_study
from kdsweep.study.config import TrainConfig
from kdsweep.study.reader import load_study

from conftest import Recorded


@pytest.fixture(scope="module")
def setup(tiny_setup):
    return tiny_setup


def on_policy(setup, **overrides) -> OnPolicy:
    tokenizer, teacher, vocab, split = setup
    values = (
        dict(
            temperature=1.0,
            max_new_tokens=6,
            pad_id=tokenizer.pad_token_id,
            eos_id=tokenizer.eos_token_id,
        )
        | overrides
    )
    return OnPolicy(OnlineTeacher(teacher, vocab), split, **values)


def settings(**overrides) -> DistillSettings:
    cfg = TrainConfig(
        max_steps=4,
        batch_size=8,
        eval_every=4,
        log_every=1,
        warmup_ratio=0.0,
        device="cpu",
        select="last",
        generation_max_new_tokens=6,
    )
    base = DistillSettings(
        alpha=0.5, temperature=2.0, top_k=None, learning_rate=1e-2, train=cfg, lmbda=1.0
    )
    return dataclasses.replace(base, **overrides)


def first_batch(setup):
    tokenizer, _, _, split = setup
    return next(train.endless_batches(split, settings(), pad_id=tokenizer.pad_token_id))


def test_the_student_completes_prompts_that_hold_no_answer(setup, tiny_models, monkeypatch):
    tokenizer, _, _, split = setup
    batch = first_batch(setup)
    seen = {}
    real = on_policy_module.generate

    def recording(model, prompts, **kwargs):
        seen["prompts"] = [tuple(p) for p in prompts]
        seen["kwargs"] = kwargs
        return real(model, prompts, **kwargs)

    monkeypatch.setattr(on_policy_module, "generate", recording)
    student = AutoModelForCausalLM.from_pretrained(tiny_models["student"])
    completions = on_policy(setup).complete(student, batch)
    rows = batch.example_ids.tolist()
    assert seen["prompts"] == [split.prompt(e) for e in rows]
    assert seen["kwargs"]["temperature"] == 1.0 and seen["kwargs"]["max_new_tokens"] == 6
    for e, prompt in zip(rows, seen["prompts"]):
        # the reference answer never leaks in
        assert split.answers[e] not in tokenizer.decode(prompt)
        assert len(prompt) < len(split.input_ids[e])
    # The completions batch: each row is its prompt then what the student generated; only the
    # generated tokens are labels.
    for row, prompt in enumerate(seen["prompts"]):
        ids = completions.input_ids[row][completions.attention_mask[row].bool()].tolist()
        labels = completions.labels[row][completions.attention_mask[row].bool()].tolist()
        assert ids[: len(prompt)] == list(prompt)
        assert labels[: len(prompt)] == [IGNORE_INDEX] * len(prompt)
        assert labels[len(prompt) :] == ids[len(prompt) :] and len(ids) > len(prompt)


def test_the_divergence_sees_only_generated_tokens_and_the_ce_the_references(setup, tiny_models):
    """The on-policy loss equals alpha * (its divergence, computed here on the generated tokens
    from the teacher's full logits) + (1 - alpha) * (the cross-entropy on the batch's answers)."""
    tokenizer, teacher, vocab, _ = setup
    batch = first_batch(setup)
    student = AutoModelForCausalLM.from_pretrained(tiny_models["student"])
    policy = on_policy(setup)
    torch.manual_seed(7)
    (result,) = policy.losses(student, [batch], settings(), vocab, autocast=contextlib.nullcontext)
    torch.manual_seed(7)
    completions = on_policy(setup).complete(student, batch)  # the same sample, from the same seed

    def forward(model, b):
        kept = b.labels[:, 1:] != IGNORE_INDEX
        hidden = models.hidden_states(model, b.input_ids, b.attention_mask)[:, :-1][kept]
        return hidden, b.labels[:, 1:][kept], kept

    hidden, labels, kept = forward(student, completions)
    with torch.no_grad():
        teacher_logits = teacher(
            input_ids=completions.input_ids, attention_mask=completions.attention_mask
        ).logits[:, :-1][kept][:, : vocab.size]
    divergence = distill_loss_from_hidden(
        hidden,
        models.output_weight(student, vocab),
        labels,
        teacher_logits=teacher_logits,
        alpha=1.0,
        temperature=2.0,
    )
    ref_hidden, ref_labels, _ = forward(student, batch)
    reference = distill_loss_from_hidden(
        ref_hidden, models.output_weight(student, vocab), ref_labels, alpha=0.0, temperature=2.0
    )
    assert int(kept.sum()) == sum(
        int((completions.labels[r, 1:] != IGNORE_INDEX).sum())
        for r in range(len(completions.labels))
    )
    assert float(result.kl) == pytest.approx(float(divergence.kl), rel=1e-5)
    assert float(result.ce) == pytest.approx(float(reference.ce), rel=1e-5)
    assert float(result.loss) == pytest.approx(
        0.5 * float(divergence.kl) + 0.5 * float(reference.ce), rel=1e-5
    )
    assert policy.generated_tokens == int(kept.sum()) and policy.batches == 1


def test_a_micro_batch_without_prompts_keeps_the_ce_at_its_weight(setup, tiny_models, monkeypatch):
    """No row to complete: no divergence term, and the cross-entropy weighs 1 - alpha, as in
    every other on-policy micro-batch (not 1)."""
    _, _, vocab, split = setup
    monkeypatch.setattr(type(split), "prompt", lambda self, e: ())
    student = AutoModelForCausalLM.from_pretrained(tiny_models["student"])
    policy = on_policy(setup)
    (result,) = policy.losses(
        student, [first_batch(setup)], settings(alpha=0.75), vocab, autocast=contextlib.nullcontext
    )
    assert float(result.loss) == pytest.approx(0.25 * float(result.ce), rel=1e-6)
    assert float(result.kl) == 0 and policy.batches == 0


def test_a_trial_with_lmbda_is_reproducible_on_the_cpu(setup, tiny_models):
    tokenizer, teacher, vocab, split = setup

    def run(lmbda: float):
        student = AutoModelForCausalLM.from_pretrained(tiny_models["student"])
        data = train.TrainingData(split, vocab, tokenizer.pad_token_id, lambda model, step: {})
        hooks = Recorded()
        train.distill(student, settings(lmbda=lmbda), data, OnlineTeacher(teacher, vocab), hooks)
        return hooks.logs

    first, second = run(0.5), run(0.5)
    assert [(log.loss, log.generated_tokens) for log in first] == [
        (log.loss, log.generated_tokens) for log in second
    ]
    generated = [0] + [log.generated_tokens for log in first]
    on_policy_steps = sum(after > before for before, after in zip(generated, generated[1:]))
    assert 0 < on_policy_steps < 4  # some steps on-policy, some not (the seeded coin)
    assert all(
        log.generation_share is not None and 0 <= log.generation_share <= 1 for log in first
    )
    off = run(0.0)
    assert all(log.generated_tokens is None for log in off)  # no on-policy step, no counter


def test_the_teacher_stays_loaded_only_when_a_trial_may_be_on_policy(tiny_study, monkeypatch):
    """A cached study with lmbda fixed at 0 loads the teacher for its cache and never again; one
    that searches lmbda loads it when its first on-policy step needs it, and keeps it beside the
    cache."""
    loads = []
    real = models.load_model
    monkeypatch.setattr(
        models, "load_model", lambda role, *a, **k: (loads.append(role), real(role, *a, **k))[1]
    )
    cached = ["search.top_k=[4, 8]"]
    TrialRunner.prepare(load_study(tiny_study, cached), progress=SweepProgress())  # the caches
    loads.clear()
    TrialRunner.prepare(load_study(tiny_study, cached), progress=SweepProgress())
    assert loads.count("teacher") == 0
    on = TrialRunner.prepare(
        load_study(tiny_study, [*cached, "search.lmbda=[0.0, 0.5]"]), progress=SweepProgress()
    )
    assert loads.count("teacher") == 0  # loaded when needed
    on.teacher.online(), on.teacher.online()
    assert loads.count("teacher") == 1  # once, then kept
    on.teacher.release()
    on.teacher.online()
    assert loads.count("teacher") == 1 and on.teacher.cached  # off-policy steps read the cache


def test_an_on_policy_study_that_builds_its_cache_loads_the_teacher_once(tiny_study, monkeypatch):
    loads = []
    real = models.load_model
    monkeypatch.setattr(
        models, "load_model", lambda role, *a, **k: (loads.append(role), real(role, *a, **k))[1]
    )
    runner = TrialRunner.prepare(
        load_study(tiny_study, ["search.top_k=[4, 8]", "search.lmbda=[0.0, 0.5]"]),
        progress=SweepProgress(),
    )
    assert loads.count("teacher") == 1
    runner.teacher.online()
    assert loads.count("teacher") == 1  # the cache's teacher, kept


def test_a_sweep_searches_lmbda(tiny_study):
    overrides = [
        "--set",
        "search.top_k=[4, 8]",
        "--set",
        "search.lmbda=[0.0, 1.0]",
        "--set",
        "train.generation_max_new_tokens=4",
        "--set",
        "sampler.name=grid",
        "--set",
        "search.alpha=0.5",
        "--set",
        "search.temperature=2.0",
        "--set",
        "search.learning_rate=0.005",
    ]
    assert main(["run", str(tiny_study), "--n-trials", "4", *overrides]) == 0
    study = load_study(tiny_study, overrides[1::2])
    trials = load_existing_study(study).trials
    assert sorted((t.params["top_k"], t.params["lmbda"]) for t in trials) == [
        (4, 0.0),
        (4, 1.0),
        (8, 0.0),
        (8, 1.0),
    ]
    client = MlflowClient(tracking_uri=study.tracking.uri)
    for trial in trials:
        run = client.get_run(trial.user_attrs["mlflow_run_id"])
        assert run.data.params["lmbda"] == str(trial.params["lmbda"])
        if trial.params["lmbda"] > 0:
            assert "lmbda=1.00" in run.info.run_name
            assert run.data.metrics[Metric.GENERATED_TOKENS] > 0
            # every step on-policy: its cost is the on-policy kind's, generation inside it
            spent = trial.user_attrs[TrialAttr.COST]
            assert spent[Metric.GENERATION_SECONDS] > 0
            assert spent[Metric.ON_POLICY_STEP_SECONDS] > 0
            assert Metric.CACHED_STEP_SECONDS not in spent
        else:
            assert (
                Metric.GENERATED_TOKENS not in run.data.metrics
                and "lmbda" not in run.info.run_name
            )
            assert Metric.ON_POLICY_STEP_SECONDS not in trial.user_attrs[TrialAttr.COST]
        assert run.data.tags[Tag.STATE] == "COMPLETE"
    text = (tiny_study.parent / "reports" / "tiny.md").read_text()
    assert "**On-policy batches:** on-policy batches (lmbda > 0)" in text
    assert " lmbda |" in text  # a column of the top configurations
