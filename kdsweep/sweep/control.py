"""The control: the best distilled configuration trained again at alpha 0, everything else equal.

The verdict compares the best distilled trial with the best baseline, each the best of its own
search. When the two searches drew different numbers of trials (six distilled draws against two
baselines', say) or the baselines' learning rates missed the winner's, part of the winner's lead
is the search's, not the teacher's. The control settles it: the winner's learning rate, steps,
seed and student form, without the teacher (alpha 0), scored on the same splits. The lead over
the tuned baseline is what distillation plus its search bought; the lead over the control is
the teacher's share.

Like the seed check's runs it is a trial of its own group (``names.Group.CONTROL``), run once
across all workers after the sweep (a worker claims it by a compare-and-set on the study), fed
to no sampler and no pruner, scored on the test split as it ends. A continued study whose best
distilled configuration changes gets a control for its new winner.
"""

from __future__ import annotations

import optuna
from optuna.trial import FrozenTrial

from kdsweep.names import Group, StudyAttr, TrialAttr
from kdsweep.progress import SweepProgress
from kdsweep.store.recovery import worker_id
from kdsweep.store.storage import set_user_attr_once
from kdsweep.store.trials import Trials, params_of
from kdsweep.study.config import StudyConfig
from kdsweep.sweep.objective import Objective, optimize

_SAME_BATCH = (TrialAttr.MICRO_BATCH, TrialAttr.GRAD_ACCUM)


def control_needed(optuna_study: optuna.Study, study: StudyConfig) -> FrozenTrial | None:
    """The distilled trial whose control the study still needs (its best, once the sweep has
    one and unless ``control: false``), or None."""
    best = Trials.of(optuna_study).best_distilled
    if not study.control or best is None:
        return None
    claimed = f"{StudyAttr.CONTROL_PREFIX}{best.number}" in optuna_study.user_attrs
    return None if claimed else best


def run_control(
    optuna_study: optuna.Study, study: StudyConfig, objective: Objective, progress: SweepProgress
) -> None:
    """Train the best distilled configuration again at alpha 0 (one worker does it)."""
    winner = control_needed(optuna_study, study)
    if winner is None:
        return
    claim = f"{StudyAttr.CONTROL_PREFIX}{winner.number}"
    if set_user_attr_once(optuna_study, claim, worker_id()) != worker_id():
        return  # another worker runs it
    progress.message(
        f"control: trial {winner.number}'s configuration trained again at alpha 0, everything "
        "else equal"
    )
    attrs = {
        TrialAttr.GROUP: Group.CONTROL,
        TrialAttr.CONTROL_OF: winner.number,
        TrialAttr.BASELINE_PARAMS: {"alpha": 0.0},  # fixed even where the study fixes alpha
        # an out-of-memory retry's smaller micro-batch, if the winner was one
        **{k: v for k, v in winner.user_attrs.items() if k in _SAME_BATCH},
    }
    params = {name: value for name, value in params_of(winner).items() if name in winner.params}
    params |= {"alpha": 0.0} if "alpha" in params else {}
    optuna_study.enqueue_trial(params, user_attrs=attrs)
    optimize(optuna_study, objective, n_trials=1, deadline=None)
