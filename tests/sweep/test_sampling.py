"""Which history each trial is sampled from, driven with Optuna's ask/tell and stub objectives:
the sweep's sampler never sees baseline or seed-check trials, a baseline searches its own
learning rate, seed-check trials are never pruned, and directions are the objectives' own."""

from __future__ import annotations

import optuna
import pytest

from kdsweep.names import Group, TrialAttr
from kdsweep.store.trials import Trials
from kdsweep.study.reader import load_study
from kdsweep.study.space import baseline_trials, suggest
from kdsweep.sweep.samplers import GroupedSampler, make_pruner, make_sampler

STUDY = """
name: s
objective: {objective}
teacher: {{name: t}}
student: {{name: s}}
data: {{dataset: d}}
eval: {{accuracy: true}}
search:
  alpha: {{low: 0.3, high: 0.9}}
  temperature: {{low: 1.0, high: 4.0}}
  top_k: [4, 8]
  learning_rate: {{low: 1.0e-4, high: 1.0e-2, log: true}}
baselines:
  - {{alpha: 0.0, trials: 3}}
"""


@pytest.fixture
def study(tmp_path):
    path = tmp_path / "s.yaml"
    path.write_text(STUDY.format(objective="student_ppl"))
    return load_study(path)


class Recording(optuna.samplers.RandomSampler):
    """A random sampler that notes which trials it was shown each time it sampled."""

    def __init__(self, seen: list, seed: int):
        super().__init__(seed=seed)
        self.seen = seen

    def sample_independent(self, study, trial, param_name, param_distribution):
        self.seen.append(
            (trial.number, sorted(t.number for t in study.get_trials(deepcopy=False)))
        )
        return super().sample_independent(study, trial, param_name, param_distribution)


def test_each_group_is_sampled_from_its_own_trials_only(study):
    seen = {}
    sampler = GroupedSampler(lambda group: Recording(seen.setdefault(group, []), seed=len(seen)))
    optuna_study = optuna.create_study(sampler=sampler)
    for params, attrs in baseline_trials(study.search, study.baselines):
        optuna_study.enqueue_trial(params, user_attrs=attrs)
    for _ in range(6):  # 3 baseline trials, then 3 of the sweep
        trial = optuna_study.ask()
        optuna_study.tell(
            trial, sum(suggest(trial, study.search)[k] for k in ("alpha", "learning_rate"))
        )
    search_numbers = [3, 4, 5]
    # A seed-check run of trial 3: every parameter fixed, the sweep's sampler must not learn from
    # it.
    optuna_study.enqueue_trial(
        optuna_study.trials[3].params,
        user_attrs={TrialAttr.GROUP: Group.SEED_CHECK, TrialAttr.SEED_CHECK_OF: 3},
    )
    trial = optuna_study.ask()
    optuna_study.tell(trial, suggest(trial, study.search)["alpha"])
    trial = optuna_study.ask()  # the sweep goes on after it
    optuna_study.tell(trial, 1.0)

    baseline_views = {tuple(v) for _, v in seen[Group.baseline(0)]}
    assert all(set(v) <= {0, 1, 2} for v in baseline_views)  # only baseline trials
    search_views = [set(v) for _, v in seen[Group.SEARCH]]
    # trial 7 sees the sweep, not trials 0-2 nor the seed-check run (6)
    assert search_views[-1] - {7} == set(search_numbers)
    # everything of a seed-check run is fixed: no sampler samples it
    assert seen.get(Group.SEED_CHECK, []) == []


def test_a_tuned_baseline_searches_its_learning_rate_at_alpha_0(study):
    trials = baseline_trials(study.search, study.baselines)
    assert len(trials) == 3
    for params, attrs in trials:
        # teacher-only knobs fixed: they do nothing
        assert params == {
            "alpha": 0.0,
            "temperature": 1.0,
            "top_k": 4,
        }
        assert attrs[TrialAttr.GROUP] == Group.baseline(0) and attrs[TrialAttr.BASELINE]
    optuna_study = optuna.create_study(
        sampler=GroupedSampler(lambda group: optuna.samplers.RandomSampler(seed=0))
    )
    for params, attrs in trials:
        optuna_study.enqueue_trial(params, user_attrs=attrs)
    rates = []
    for _ in range(3):
        trial = optuna_study.ask()
        params = suggest(trial, study.search)
        assert params["alpha"] == 0.0
        rates.append(params["learning_rate"])
        optuna_study.tell(trial, 1.0)
    assert len(set(rates)) == 3 and all(1e-4 <= r <= 1e-2 for r in rates)


X = {"x": optuna.distributions.FloatDistribution(0, 1)}


def _told(optuna_study, value: float, **attrs):
    """A trial of the study's with ``attrs``, reported at steps 1 and 2, told ``value``."""
    optuna_study.enqueue_trial({"x": 0.5}, user_attrs=attrs)
    trial = optuna_study.ask(X)
    for step in (1, 2):
        trial.report(value, step=step)
    optuna_study.tell(trial, value)


def _judged(optuna_study, value: float, **attrs) -> bool:
    """Whether a new trial with ``attrs`` that reports ``value`` at step 2 is pruned."""
    optuna_study.enqueue_trial({"x": 0.5}, user_attrs=attrs)
    trial = optuna_study.ask(X)
    trial.report(value, step=2)
    pruned = trial.should_prune()
    optuna_study.tell(trial, value)
    return pruned


BASELINE = {TrialAttr.BASELINE: True, TrialAttr.GROUP: Group.baseline(0)}


@pytest.mark.parametrize("pruner", ["median", "hyperband"])
def test_each_arm_is_pruned_against_its_own(tmp_path, pruner):
    """Baselines whose curves fall fast (1.0) set no bar for distilled trials (5.0): a distilled
    trial is judged against distilled peers only, and needs some before it can be pruned; the
    seed check's and the control's runs are never pruned."""
    path = tmp_path / "s.yaml"
    path.write_text(
        STUDY.format(objective="student_ppl")
        + f"pruner: {{name: {pruner}, n_startup_trials: 2}}\n"
        + "train: {max_steps: 2, eval_every: 1}\n"
    )
    optuna_study = optuna.create_study(pruner=make_pruner(load_study(path)))
    for _ in range(3):
        _told(optuna_study, 1.0, **BASELINE)
    assert not _judged(optuna_study, 5.0)  # the baselines' 1.0 is no bar for it
    if pruner == "median":
        assert not _judged(optuna_study, 5.0)  # its second distilled peer: still startup
        assert _judged(optuna_study, 9.0)  # worse than its distilled peers' median
        assert _judged(optuna_study, 9.0, **BASELINE)  # a baseline, against the baselines
    for group in (Group.SEED_CHECK, Group.CONTROL):
        assert not _judged(optuna_study, 99.0, **{TrialAttr.GROUP: group})


def test_hyperband_is_the_studys_pruner_so_the_sampler_sees_one_bracket(tmp_path):
    """Optuna finds a HyperbandPruner by its type to give the sampler one bracket's trials: the
    study's pruner must be one, not a wrapper around it."""
    from optuna.pruners import _filter_study

    path = tmp_path / "s.yaml"
    path.write_text(
        STUDY.format(objective="student_ppl")
        + "pruner: {name: hyperband}\ntrain: {max_steps: 90, eval_every: 10}\n"
    )
    optuna_study = optuna.create_study(pruner=make_pruner(load_study(path)))
    for _ in range(3):
        optuna_study.tell(optuna_study.ask(), 1.0)
    assert _filter_study(optuna_study, optuna_study.ask()) is not optuna_study


@pytest.mark.parametrize(
    "objective, direction",
    [
        ("student_ppl", "minimize"),
        ("ppl_ratio", "minimize"),
        ("exact_match", "maximize"),
        ("rouge_l", "maximize"),
    ],
)
def test_objectives_declare_their_direction(tmp_path, objective, direction):
    path = tmp_path / "s.yaml"
    path.write_text(STUDY.format(objective=objective))
    study = load_study(path)
    assert study.direction == direction
    optuna_study = optuna.create_study(direction=direction)
    for value in (0.2, 0.9, 0.5):
        optuna_study.tell(optuna_study.ask(), value)
    best = Trials.of(optuna_study).best
    assert best.value == (0.2 if direction == "minimize" else 0.9)
    assert [t.value for t in Trials.of(optuna_study).ranked] == sorted(
        [0.2, 0.9, 0.5], reverse=direction == "maximize"
    )


def test_an_accuracy_objective_needs_decoded_answers(tmp_path):
    from kdsweep.errors import StudyError

    path = tmp_path / "s.yaml"
    path.write_text(
        STUDY.format(objective="exact_match").replace(
            "eval: {accuracy: true}", "eval: {accuracy: false}"
        )
    )
    with pytest.raises(StudyError) as info:
        load_study(path)
    assert any(
        "objective: exact_match needs the answers decoded: set eval.accuracy: true" in p
        for p in info.value.problems
    )


def test_the_gp_sampler_models_the_sweep_and_draws_the_same_twice(tmp_path):
    """sampler.name gp: after its random start, Optuna's GPSampler draws the sweep's trials (the
    baselines keep their random sampler), and the same study run again draws the same."""
    path = tmp_path / "s.yaml"
    path.write_text(
        STUDY.format(objective="student_ppl") + "sampler: {name: gp, n_startup_trials: 2}\n"
    )
    study = load_study(path)

    def sweep() -> list[dict]:
        sampler = make_sampler(study)
        optuna_study = optuna.create_study(sampler=sampler)
        for params, attrs in baseline_trials(study.search, study.baselines):
            optuna_study.enqueue_trial(params, user_attrs=attrs)
        for _ in range(8):  # 3 baselines, 2 random sweep trials, 3 the GP draws
            trial = optuna_study.ask()
            params = suggest(trial, study.search)
            optuna_study.tell(trial, (params["alpha"] - 0.5) ** 2 + params["temperature"])
        assert isinstance(sampler._samplers[Group.SEARCH], optuna.samplers.GPSampler)
        return [t.params for t in optuna_study.trials]

    assert sweep() == sweep()
