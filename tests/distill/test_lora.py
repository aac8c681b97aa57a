"""The student's form: a LoRA adapter of rank r (peft) trains in place of the whole student, and
every part of a trial (the loss, checkpoints, resume, the finalists, the saved model, the report)
works with it."""

from __future__ import annotations

import dataclasses
import importlib.util
import re

import pytest
import torch
from transformers import AutoModelForCausalLM

from kdsweep.cli import main
from kdsweep.distill import lora, train
from kdsweep.distill.checkpoints import BestCheckpoint
from kdsweep.distill.loss import DistillSettings
from kdsweep.distill.models import hidden_states, output_weight
from kdsweep.names import ADAPTER_ARTIFACT, MODEL_ARTIFACT, Metric, Tag, TrialAttr
from kdsweep.store.storage import load_existing_study
from kdsweep.store.trials import Trials
from kdsweep.study.config import LoraConfig, TrainConfig
from kdsweep.study.reader import load_study

from conftest import Recorded, mlflow_runs, written

pytestmark = pytest.mark.skipif(
    importlib.util.find_spec("peft") is None, reason='needs peft: pip install "kdsweep[lora]"'
)


def _student(tiny_setup, rank: int, **settings):
    _, teacher, _, _ = tiny_setup
    student = AutoModelForCausalLM.from_pretrained(teacher.name_or_path)
    torch.manual_seed(0)
    return lora.adapt(student, rank, LoraConfig(**settings))


def _settings(steps: int = 3, **fixed) -> DistillSettings:
    return DistillSettings(
        alpha=0.0,
        temperature=1.0,
        top_k=None,
        learning_rate=1e-2,
        train=TrainConfig(
            max_steps=steps, batch_size=8, eval_every=steps, log_every=1, device="cpu", **fixed
        ),
    )


def _train(tiny_setup, student, settings: DistillSettings, hooks=None) -> None:
    """Train ``student`` alone (alpha 0), its evaluation a constant."""
    tokenizer, _, vocab, split = tiny_setup
    evaluate = lambda model, step: {Metric.STUDENT_PPL: 1.0}  # noqa: E731
    data = train.TrainingData(split, vocab, tokenizer.pad_token_id, evaluate)
    train.distill(student, settings, data, None, hooks)


def test_only_the_adapter_trains_and_gets_optimizer_states(tiny_setup, monkeypatch):
    student = _student(tiny_setup, 4)
    frozen = {n: p.clone() for n, p in student.named_parameters() if not p.requires_grad}
    adapter = {n: p.clone() for n, p in student.named_parameters() if p.requires_grad}
    assert adapter and all("lora_" in n for n in adapter)
    optimizers = []
    real = torch.optim.AdamW
    monkeypatch.setattr(
        torch.optim,
        "AdamW",
        lambda params, **kw: optimizers.append(real(params, **kw)) or optimizers[-1],
    )
    _train(tiny_setup, student, _settings())
    (optimizer,) = optimizers
    states = optimizer.state.values()
    assert sum(p.numel() for p in optimizer.param_groups[0]["params"]) == sum(
        p.numel() for p in adapter.values()
    )
    assert len(states) == len(adapter)  # AdamW's moments for the adapter's tensors only
    now = dict(student.named_parameters())
    assert all(torch.equal(now[n], p) for n, p in frozen.items())
    assert any(not torch.equal(now[n], p) for n, p in adapter.items())


def test_the_hidden_state_loss_sees_an_adapter_on_the_output_layer(tiny_setup):
    """Targeting lm_head: the loss's output weight is the frozen weight plus the adapter's
    update, so its logits are the model's own, and the adapter on it trains."""
    _, _, vocab, split = tiny_setup
    student = _student(tiny_setup, 4, target_modules=("q_proj", "lm_head"))
    head = student.get_output_embeddings()
    with torch.no_grad():  # B starts at zero: give the update a value
        for name, p in head.named_parameters():
            if "lora_B" in name:
                p.normal_()
    batch = torch.tensor([list(split.input_ids[0])])
    mask = torch.ones_like(batch)
    hidden = hidden_states(student, batch, mask)
    logits = hidden @ output_weight(student, vocab).T
    expected = student(input_ids=batch, attention_mask=mask).logits[..., : vocab.size]
    torch.testing.assert_close(logits, expected, rtol=1e-5, atol=1e-5)
    logits.sum().backward()
    assert any(p.grad is not None for n, p in head.named_parameters() if "lora_A" in n)


def test_a_students_trained_state_is_its_adapter_and_loads_back(tiny_setup):
    student = _student(tiny_setup, 4)
    state = lora.trained_state(student)
    assert state and all("lora_" in name for name in state)
    with torch.no_grad():
        for tensor in state.values():
            tensor.add_(1.0)
    copy = {k: v.clone() for k, v in state.items()}
    fresh = _student(tiny_setup, 4)
    lora.load_trained_state(fresh, copy)
    for name, tensor in lora.trained_state(fresh).items():
        assert torch.equal(tensor, copy[name])
    whole = AutoModelForCausalLM.from_pretrained(tiny_setup[1].name_or_path)
    assert lora.trained_state(whole).keys() == whole.state_dict().keys()


def test_the_best_checkpoint_of_a_lora_student_copies_its_adapter_only(tiny_setup):
    student = _student(tiny_setup, 4)
    best = BestCheckpoint(lambda new, old: True)
    best.offer(1, {Metric.STUDENT_PPL: 2.0}, student, last=False)
    assert best.state.keys() == lora.trained_state(student).keys()
    before = {k: v.clone() for k, v in best.state.items()}
    with torch.no_grad():
        for p in student.parameters():
            p.add_(1.0)
    best.restore(student)
    for name, tensor in lora.trained_state(student).items():
        assert torch.equal(tensor, before[name])


def test_a_lora_trial_resumes_exactly(tiny_setup):
    """A LoRA trial stopped after step 2 and resumed from its checkpoint ends where the
    uninterrupted one does."""
    whole = _student(tiny_setup, 4)
    _train(tiny_setup, whole, _settings(4))

    class StopAfter2(Recorded):
        def checkpoint(self, state):
            self.states.append(dataclasses.replace(state, student=dict(state.student)))
            if state.step == 2:
                raise KeyboardInterrupt

    stopping = StopAfter2(checkpointing=True)
    with pytest.raises(KeyboardInterrupt):
        _train(tiny_setup, _student(tiny_setup, 4), _settings(4, checkpoint_every=1), stopping)
    state = stopping.states[-1]
    assert all("lora_" in name for name in state.student)
    resumed = _student(tiny_setup, 4)
    _train(tiny_setup, resumed, _settings(4), Recorded(resume=state))
    for name, tensor in lora.trained_state(resumed).items():
        torch.testing.assert_close(tensor, lora.trained_state(whole)[name], rtol=0, atol=0)


LORA = ["search.lora_rank=[0, 4]", "n_trials=5", "train.max_steps=6", "train.eval_every=3"]
BASELINES = ["baselines=[{alpha: 0.0, lora_rank: 0}, {alpha: 0.0, lora_rank: 4}]"]
SPLITS = ["data.train_split=train", "data.eval_split=test[:8]", "data.test_split=test[8:]"]


def test_a_sweep_over_the_students_form_runs_to_its_report(tiny_study, capsys):
    """Full fine-tuning and LoRA rank 4 in one study, a baseline of each form: every run logs its
    rank and what it trains, the teacher cache serves both forms, and the report shows the form
    in every table, each form's best learning rate, and a like-with-like verdict."""
    sets = [*LORA, *BASELINES, *SPLITS, "search.top_k=[4]", "seed_check.top=1"]
    assert main(["run", str(tiny_study), *(a for s in sets for a in ("--set", s))]) == 0
    study = load_study(tiny_study, sets)
    stored = load_existing_study(study)
    trials = stored.trials
    # The closing summary names the baseline the verdict compares with: of the winner's form.
    compared = Trials.of(stored).compared_baseline
    assert f"best baseline, trial {compared.number} " in capsys.readouterr().out
    ranks = {t.number: t.user_attrs[TrialAttr.PARAMS]["lora_rank"] for t in trials}
    assert {0, 4} <= set(ranks.values())
    counts = {t.number: t.user_attrs[TrialAttr.TRAINABLE_PARAMETERS] for t in trials}
    whole = max(counts.values())
    assert all(counts[n] < whole / 2 for n, r in ranks.items() if r == 4)
    assert all(counts[n] == whole for n, r in ranks.items() if r == 0)
    client, _, runs = mlflow_runs(tiny_study, overrides=sets)
    for number, run in runs.items():
        assert run.data.params["lora_rank"] == str(ranks[number])
        assert run.data.metrics[Metric.TRAINABLE_PARAMETERS] == counts[number]
        assert (" r=4" in run.info.run_name) == (ranks[number] == 4)

    report = (tiny_study.parent / "reports" / "tiny.md").read_text()
    assert "| LoRA rank |" in report.split("## Top configurations")[1].split("\n## ")[0]
    forms = report.split("## Student form")[1].split("\n## ")[0]
    assert "full fine-tuning" in forms and "LoRA rank 4" in forms
    assert "learning rate (trained at)" in forms
    assert re.search(r"Like with like: both are (full fine-tuning|LoRA rank 4)\.", report)
    # The finalists were scored on the test split from their kept (adapter) checkpoints.
    assert sum(key.startswith("test:") for key in stored.user_attrs) >= 2


def test_a_lora_winner_is_saved_as_its_adapter_and_a_merged_model(tiny_study, tmp_path):
    sets = ["search.lora_rank=4", "n_trials=2", "save_best=true", "register_as=tiny-lora"]
    assert (
        main(["run", str(tiny_study), "--no-report", *(a for s in sets for a in ("--set", s))])
        == 0
    )
    study = load_study(tiny_study, sets)
    client, _, runs = mlflow_runs(tiny_study, overrides=sets)
    best = min(load_existing_study(study).trials, key=lambda t: t.value)
    saved = runs[best.number]
    assert saved.data.tags.get(Tag.MODEL) == "saved"
    names = {a.path for a in client.list_artifacts(saved.info.run_id)}
    assert {MODEL_ARTIFACT, ADAPTER_ARTIFACT} <= names
    champion = client.get_model_version_by_alias("tiny-lora", "champion")
    assert champion.run_id == saved.info.run_id  # the registry alias follows the merged model
    assert champion.source.endswith(MODEL_ARTIFACT)
    folder = client.download_artifacts(saved.info.run_id, "", str(tmp_path / "saved"))
    import mlflow.transformers
    from peft import PeftModel

    merged = mlflow.transformers.load_model(f"{folder}/{MODEL_ARTIFACT}", return_type="components")
    model = merged["model"]
    base = AutoModelForCausalLM.from_pretrained(study.student.name)
    adapted = PeftModel.from_pretrained(base, f"{folder}/{ADAPTER_ARTIFACT}")
    ids = torch.tensor([[1, 2, 3, 4]])
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, adapted(ids).logits, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize(
    ("setting", "message"),
    [
        ("search.lora_rank=[0, -4]", "search.lora_rank.choices[1]: must be an integer >= 0"),
        ("search.lora_rank=[x, 4]", "search.lora_rank.choices[0]: must be an integer >= 0"),
        ("student.lora.target_modules=[]", "student.lora.target_modules: must list module names"),
        ("search.lora_rank={low: 0, high: 8}", "search.lora_rank: must be a list of choices"),
        ("student.lora.dropout=1.5", "student.lora.dropout: must be in [0, 1)"),
        (
            "student.lora.target_modules=c_attn",
            "student.lora.target_modules: must be 'all-linear'",
        ),
    ],
)
def test_bad_lora_settings_exit_2(tiny_study, capsys, setting, message):
    assert main(["run", str(tiny_study), "--set", setting]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and message in err[0]


def test_a_target_module_the_student_lacks_exits_2_writing_nothing(tiny_study, capsys):
    before = written(tiny_study.parent)
    sets = ["--set", "search.lora_rank=4", "--set", "student.lora.target_modules=[c_attn]"]
    assert main(["run", str(tiny_study), *sets]) == 2
    err = [line for line in capsys.readouterr().err.splitlines() if line.startswith("kdsweep:")]
    assert len(err) == 1  # after the progress line "loading tokenizer and data"
    assert (
        "student.lora.target_modules: the student (Qwen3ForCausalLM) has no module named 'c_attn'"
        in err[0]
    )
    assert "q_proj" in err[0]
    assert written(tiny_study.parent) == before


def test_lora_without_peft_names_the_extra(tiny_study, capsys, monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name == "peft" else real(name, *a)
    )
    assert main(["check", str(tiny_study), "--set", "search.lora_rank=[0, 8]"]) == 2
    err = capsys.readouterr().err.strip()
    assert 'pip install "kdsweep[lora]"' in err and "search.lora_rank" in err
    assert main(["check", str(tiny_study)]) == 0  # full fine-tuning needs no peft


def test_on_policy_steps_train_a_lora_student(tiny_study):
    """The adapted student samples its own completions, which the teacher scores online."""
    sets = [
        *("search.lora_rank=4", "search.lmbda=1.0", "search.top_k=[4]", "n_trials=1"),
        *("train.max_steps=4", "train.eval_every=4", "train.generation_max_new_tokens=4"),
    ]
    assert (
        main(["run", str(tiny_study), "--no-report", *(a for s in sets for a in ("--set", s))])
        == 0
    )
    (trial,) = load_existing_study(load_study(tiny_study, sets)).trials
    assert trial.state.name == "COMPLETE"
    client, _, runs = mlflow_runs(tiny_study, overrides=sets)
    generated = client.get_metric_history(runs[0].info.run_id, Metric.GENERATED_TOKENS)
    assert generated and generated[-1].value > 0


def test_a_merged_student_computes_what_the_adapted_one_does(tiny_setup):
    """With an adapter on the output layer of a student that ties it to its input embeddings,
    merging unties the two: the merged model's logits are the adapted model's."""
    student = _student(tiny_setup, 4, target_modules=("q_proj", "lm_head"))
    with torch.no_grad():
        for name, p in student.named_parameters():
            if "lora_B" in name:
                p.normal_()
    ids = torch.tensor([[1, 2, 3, 4, 5]])
    with torch.no_grad():
        adapted = student(input_ids=ids).logits
        plain = lora.merged(student)
        assert not hasattr(plain, "peft_config") and not plain.config.tie_word_embeddings
        torch.testing.assert_close(plain(input_ids=ids).logits, adapted, rtol=1e-4, atol=1e-4)
