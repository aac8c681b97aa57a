"""The teacher signal: the top-K cache against the online teacher, its key, its building, and
which one a sweep uses."""

from __future__ import annotations

import json
import threading
from functools import partial
from pathlib import Path

import optuna
import pytest
import torch
from mlflow.tracking import MlflowClient
from transformers import AutoTokenizer, Qwen3ForCausalLM

from kdsweep.cli import main
from kdsweep.data import make_batches, tokenize
from kdsweep.distill import models
from kdsweep.distill.evaluate import score
from kdsweep.distill.models import Vocabulary
from kdsweep.distill.targets import OnlineTeacher
from kdsweep.names import StudyAttr, TrialAttr
from kdsweep.paths import teacher_cache_dir
from kdsweep.prepare import teacher_cache
from kdsweep.prepare.teacher import build_cache, rows_trials_read
from kdsweep.prepare.teacher_cache import (
    CachedTeacher,
    CacheKey,
    find_cache,
    open_or_build,
    write_cache,
)
from kdsweep.prepare.trial_runner import TrialRunner
from kdsweep.progress import SweepProgress
from kdsweep.store.storage import load_existing_study
from kdsweep.study.reader import load_study

from conftest import chat_split, guanaco_rows

FP16_ATOL = 2e-2  # fp16 keeps 11 significant bits: |logit| < 16 is stored within 1/128


@pytest.fixture(scope="module")
def tiny(tiny_models):
    """The tiny teacher, online, and a split of 40 rows with assistant-only labels."""
    tokenizer = AutoTokenizer.from_pretrained(tiny_models["teacher"])
    model = Qwen3ForCausalLM.from_pretrained(tiny_models["teacher"]).eval().requires_grad_(False)
    vocab = Vocabulary(
        size=len(tokenizer),
        teacher_rows=model.config.vocab_size,
        student_rows=model.config.vocab_size,
    )
    split = tokenize(
        guanaco_rows(40, seed=0),
        tokenizer,
        max_length=48,
        assistant_only=True,
    )
    return OnlineTeacher(model, vocab), split, tokenizer.pad_token_id


def build(root: Path, tiny, *, k: int, key: CacheKey | None = None) -> CachedTeacher:
    teacher, split, pad_id = tiny
    write = partial(write_cache, teacher, split, k=k, batch_size=7, pad_id=pad_id, chunk_tokens=50)
    cache, _ = open_or_build(root, key or a_key(), k=k, write=write)
    return cache


def a_key(**changes) -> CacheKey:
    fields = (
        dict(teacher={"name": "t"}, tokenizer="v", data={"split": "train"}, tokens="abc") | changes
    )
    return CacheKey(**fields)


# ---------------------------------------------------------------- cached targets == online targets


@pytest.mark.parametrize("shuffle_seed,grouped", [(None, False), (3, True), (5, False)])
def test_cached_targets_equal_online_targets(tmp_path, tiny, shuffle_seed, grouped):
    teacher, split, pad_id = tiny
    cache = build(tmp_path, tiny, k=16)
    for batch in make_batches(
        split, batch_size=6, pad_id=pad_id, shuffle_seed=shuffle_seed, group_by_length=grouped
    ):
        logits = teacher.targets(batch, top_k=None).logits  # [N, V], row-major scored positions
        cached = cache.targets(batch, top_k=16)
        assert cached.values.shape == cached.indices.shape == (batch.num_scored_tokens, 16)
        online = torch.topk(logits, 16, dim=-1).values
        torch.testing.assert_close(cached.values.float(), online, atol=FP16_ATOL, rtol=0)
        # The stored ids hold the stored values (ties may order ids differently, values not).
        torch.testing.assert_close(
            logits.gather(1, cached.indices.long()), cached.values.float(), atol=FP16_ATOL, rtol=0
        )


def test_a_smaller_top_k_reads_the_prefix(tmp_path, tiny):
    teacher, split, pad_id = tiny
    cache = build(tmp_path, tiny, k=16)
    batch = make_batches(split, batch_size=8, pad_id=pad_id, shuffle_seed=1, group_by_length=True)[
        0
    ]
    full, small = cache.targets(batch, top_k=16), cache.targets(batch, top_k=4)
    assert small.values.shape[1] == 4
    assert torch.equal(small.values, full.values[:, :4]) and torch.equal(
        small.indices, full.indices[:, :4]
    )
    online = teacher.targets(batch, top_k=4)
    torch.testing.assert_close(small.values.float(), online.values, atol=FP16_ATOL, rtol=0)
    with pytest.raises(ValueError, match="top 16 logits"):
        cache.targets(batch, top_k=17)
    with pytest.raises(ValueError, match="whole vocabulary"):
        cache.targets(batch, top_k=None)


def test_lse_mass_and_perplexity_match_the_full_softmax(tmp_path, tiny):
    teacher, split, pad_id = tiny
    cache = build(tmp_path, tiny, k=16)
    in_order = make_batches(
        split, batch_size=len(split), pad_id=pad_id, shuffle_seed=None, group_by_length=False
    )
    logits = teacher.targets(in_order[0], top_k=None).logits.double()  # rows in the cache's order
    lse = torch.logsumexp(logits, dim=-1)
    torch.testing.assert_close(
        torch.tensor(cache.lse, dtype=torch.float64), lse, atol=1e-4, rtol=0
    )
    probs = torch.softmax(logits, dim=-1)
    for k in (1, 4, 16):
        expected = float(probs.topk(k, dim=-1).values.sum(-1).mean())
        assert cache.mass(k) == pytest.approx(expected, abs=2e-3)
    assert 0 < cache.mass(1) < cache.mass(4) < cache.mass(16) < 1
    assert cache.perplexity() == pytest.approx(
        score(teacher.model, in_order, teacher.vocab).perplexity, rel=1e-4
    )


def test_the_teacher_runs_once_over_the_tokens(tmp_path, tiny):
    teacher, split, _ = tiny
    cache = build(tmp_path, tiny, k=8)
    assert cache.manifest["teacher_tokens"] == sum(len(ids) for ids in split.input_ids)
    assert cache.rows == split.num_scored_tokens == cache.values.shape[0]


# ---------------------------------------------------------------- building: atomic, locked, keyed


def test_an_interrupted_build_is_never_used(tmp_path, tiny):
    teacher, split, pad_id = tiny

    def dies_half_way(folder: Path) -> dict:
        write_cache(teacher, split, folder, k=8, batch_size=7, pad_id=pad_id, chunk_tokens=50)
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        open_or_build(tmp_path, a_key(), k=8, write=dies_half_way)
    assert list(tmp_path.iterdir()) == [tmp_path / f"{a_key().digest()}.lock"]
    assert find_cache(tmp_path, a_key(), k=8) is None
    # A builder killed outright leaves its staging folder, complete-looking: it is never read.
    staging = tmp_path / f".{a_key().digest()}-k8-killed"
    staging.mkdir()
    (staging / "manifest.json").write_text(
        json.dumps({"complete": True, "k": 8, "vocab_size": 999})
    )
    assert find_cache(tmp_path, a_key(), k=8) is None
    cache = build(tmp_path, tiny, k=8)
    assert cache.folder.name == f"{a_key().digest()}-k8" and not staging.exists()


def test_concurrent_builders_make_one_cache(tmp_path, tiny, monkeypatch):
    """Three builders at once: the one holding the lock writes only once the other two have
    looked for the cache (and so wait on the lock, or find it built): one build, three caches."""
    teacher, split, pad_id = tiny
    builds, results = [], []
    start = threading.Barrier(3)
    looked = threading.Semaphore(0)
    real_find = teacher_cache.find_cache

    def counting_find(*args, **kwargs):
        looked.release()
        return real_find(*args, **kwargs)

    monkeypatch.setattr(teacher_cache, "find_cache", counting_find)

    def slow_write(folder: Path) -> dict:
        builds.append(folder)
        for _ in range(4):  # its own two looks, and one by each other builder before the lock
            assert looked.acquire(timeout=30)
        return write_cache(
            teacher, split, folder, k=8, batch_size=7, pad_id=pad_id, chunk_tokens=50
        )

    def worker():
        start.wait()
        results.append(open_or_build(tmp_path, a_key(), k=8, write=slow_write))

    threads = [threading.Thread(target=worker) for _ in range(3)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len(builds) == 1
    assert sorted(built for _, built in results) == [False, False, True]
    assert len({cache.folder for cache, _ in results}) == 1


def test_a_larger_cache_serves_a_smaller_k(tmp_path, tiny):
    big = build(tmp_path, tiny, k=16)
    assert find_cache(tmp_path, a_key(), k=8).folder == big.folder
    assert find_cache(tmp_path, a_key(), k=17) is None
    assert find_cache(tmp_path, a_key(tokens="other"), k=8) is None


def variant(tiny_study: Path, *overrides: str) -> Path:
    return build_cache(load_study(tiny_study, ["search.top_k=[4, 8]", *overrides]))


def test_the_cache_is_keyed_by_teacher_data_max_length_and_k(tiny_study, tiny_models, tmp_path):
    other_teacher = tmp_path / "teacher2"
    model = Qwen3ForCausalLM.from_pretrained(tiny_models["teacher"])
    with torch.no_grad():
        model.model.norm.weight.add_(0.01)
    model.save_pretrained(other_teacher)
    AutoTokenizer.from_pretrained(tiny_models["teacher"]).save_pretrained(other_teacher)

    base = variant(tiny_study)
    assert variant(tiny_study) == base
    others = [
        variant(tiny_study, "search.top_k=[4, 16]"),
        variant(tiny_study, "data.max_length=32"),
        variant(tiny_study, "data.train_split=train[:40]"),
        variant(tiny_study, f"teacher.name={other_teacher}"),
    ]
    assert len({base, *others}) == 5
    assert base.name.endswith("-k8") and others[0].name.endswith("-k16")
    assert others[0].name.split("-k")[0] == base.name.split("-k")[0]  # only K changed


# ---------------------------------------------------------------- the command and the sweep


def teacher_loads(monkeypatch) -> list[str]:
    loads = []
    original = models.load_model

    def counting(role, *args, **kwargs):
        loads.append(role)
        return original(role, *args, **kwargs)

    monkeypatch.setattr(models, "load_model", counting)
    return loads


def test_cache_command_builds_once_then_reuses(tiny_study, monkeypatch, capsys):
    loads = teacher_loads(monkeypatch)
    finite = ["--set", "search.top_k=[4, 8]"]
    assert main(["cache", str(tiny_study), *finite]) == 0
    first = capsys.readouterr().out.strip().removeprefix("teacher cache: ")
    assert loads == ["teacher"]
    assert main(["cache", str(tiny_study), *finite]) == 0
    assert capsys.readouterr().out.strip().removeprefix("teacher cache: ") == first
    assert loads == ["teacher"]  # the second call read no weights
    manifest = json.loads((Path(first) / "manifest.json").read_text())
    assert manifest["complete"] and manifest["k"] == 8
    assert Path(first).parent == teacher_cache_dir()

    assert main(["cache", str(tiny_study)]) == 2  # top_k [4, all]: whole-vocabulary trials
    assert "'all'" in capsys.readouterr().err


def train_tokens(tiny_study: Path, overrides: list[str] = ()) -> int:
    """The tokens of the training rows the study's trials read (rows_trials_read)."""
    study = load_study(tiny_study, list(overrides))
    tokenizer = AutoTokenizer.from_pretrained(study.teacher.name)
    # what tiny_data's train.jsonl holds
    split = chat_split(tokenizer, 64, seed=0, max_length=study.data.max_length)
    read = rows_trials_read(study, split)
    rows = range(len(split)) if read is None else read
    return sum(len(split.input_ids[row]) for row in rows)


def online_calls(monkeypatch) -> list[int]:
    calls = []
    original = OnlineTeacher.targets

    def counting(self, batch, **kwargs):
        calls.append(batch.num_tokens)
        return original(self, batch, **kwargs)

    monkeypatch.setattr(OnlineTeacher, "targets", counting)
    return calls


def test_a_finite_top_k_sweep_runs_the_teacher_once(tiny_study, monkeypatch):
    calls, loads = online_calls(monkeypatch), teacher_loads(monkeypatch)
    finite = [
        "--set",
        "search.top_k=[4, 8]",
        "--set",
        "train.max_steps=4",
        "--set",
        "train.eval_every=2",
    ]
    assert main(["run", str(tiny_study), *finite, "--no-report"]) == 0

    optuna_study = load_existing_study(load_study(tiny_study))
    assert [t.state for t in optuna_study.get_trials()] == [optuna.trial.TrialState.COMPLETE] * 2
    assert calls == [] and loads.count("teacher") == 1  # loaded once to build, never run online
    [train_cache] = [c for c in teacher_cache_dir().glob("*-k8")]
    # once over the 32 rows its 2 trials of 4 steps of 8 read
    sets = [s for s in finite if s != "--set"]
    assert CachedTeacher(train_cache).manifest["teacher_tokens"] == train_tokens(tiny_study, sets)
    assert CachedTeacher(train_cache).manifest["covered_examples"] == 32

    mass = optuna_study.user_attrs["topk_mass"]
    assert set(mass) == {"4", "8"} and 0 < mass["4"] < mass["8"] < 1
    parent = MlflowClient(load_study(tiny_study).tracking.uri).get_run(
        optuna_study.user_attrs[StudyAttr.PARENT_RUN_ID]
    )
    assert parent.data.metrics["topk_mass_k8"] == pytest.approx(mass["8"])
    assert parent.data.metrics["train_padding_share"] == pytest.approx(
        optuna_study.user_attrs["train_padding_share"]
    )
    assert 0 <= parent.data.metrics["train_padding_share"] < 0.5
    for trial in optuna_study.get_trials():  # each trial knows the mass its own top_k keeps
        assert trial.user_attrs["topk_mass"] == pytest.approx(
            mass[str(trial.user_attrs[TrialAttr.PARAMS]["top_k"])]
        )


@pytest.mark.parametrize("overrides", [[], ["search.top_k=[4]", "train.teacher_cache=false"]])
def test_whole_vocabulary_or_cache_off_runs_the_teacher_online(tiny_study, overrides):
    # top_k [4, all] by default
    ws = TrialRunner.prepare(load_study(tiny_study, overrides), progress=SweepProgress())
    assert not ws.teacher.cached
    # the eval set's targets
    assert ws.teacher.tokens_processed == sum(b.num_tokens for b in ws.eval_set.batches)
    assert not teacher_cache_dir().exists()
    assert ws.topk_mass({"top_k": 4}) is None
