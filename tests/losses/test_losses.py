"""kdsweep.losses against the plain formulas computed in float64 with full softmaxes."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from kdsweep.losses import (
    LossResult,
    _chunks,
    distill_loss,
    distill_loss_from_hidden,
    distill_loss_sparse,
)
from kdsweep.losses._chunks import chunk_sizes
from kdsweep.losses._students import HiddenStudent, LogitsStudent
from kdsweep.losses._teacher import Teacher, TeacherInputs

B, S, V, H = 2, 7, 33, 6
LOG_TINY = math.log(torch.finfo(torch.float32).tiny)
BETAS = [0.0, 0.3, 0.5, 0.9, 1.0]


def make_batch(*, seed: int = 0, ignored: float = 0.3) -> dict[str, torch.Tensor]:
    """Student/teacher logits [B, S, V], hidden [B, S, H], weight [V, H], labels [B, S]."""
    gen = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, V, (B, S), generator=gen)
    labels[torch.rand(B, S, generator=gen) < ignored] = -100
    return {
        "student": 2 * torch.randn(B, S, V, generator=gen),
        "teacher": 3 * torch.randn(B, S, V, generator=gen),
        "hidden": torch.randn(B, S, H, generator=gen),
        "weight": torch.randn(V, H, generator=gen),
        "labels": labels,
    }


def reference(
    student: torch.Tensor,
    labels: torch.Tensor,
    *,
    alpha: float,
    temperature: float,
    teacher: torch.Tensor | None = None,
    top_k: int | None = None,
    support: torch.Tensor | None = None,
    beta: float = 0.0,
) -> LossResult:
    """The formulas in float64 with full softmaxes (a truncated teacher as in kdsweep.losses'
    docstring).

    ``support`` [..., K] gives the kept vocabulary ids directly (sparse form); ``top_k`` takes them
    from the teacher's top-k.
    """
    keep = labels != -100
    student, labels = student.double()[keep], labels[keep]
    count = max(int(keep.sum()), 1)
    ce = -torch.log_softmax(student, -1).gather(-1, labels[:, None]).sum() / count
    if teacher is None:
        kl = student.new_zeros(())
    else:
        if top_k is not None and top_k < student.shape[-1]:
            support = teacher[keep].topk(top_k, dim=-1).indices
        elif support is not None:
            support = support[keep].long()
        log_p = torch.log_softmax(teacher.double()[keep] / temperature, -1)
        log_q = torch.log_softmax(student / temperature, -1)
        divergence = truncated_jsd(log_p, log_q, support, beta=beta)
        kl = temperature**2 * divergence.sum() / count
    return LossResult(loss=alpha * kl + (1 - alpha) * ce, kl=kl, ce=ce)


def truncated_jsd(
    log_p: torch.Tensor, log_q: torch.Tensor, support: torch.Tensor | None, *, beta: float
) -> torch.Tensor:
    """Per-row generalized JSD of full log-probs [n, V], the teacher known on ``support`` only."""
    if support is None:
        return generalized_jsd(log_p, log_q, beta)
    log_p_kept, log_q_kept = log_p.gather(-1, support), log_q.gather(-1, support)
    log_p_kept = log_p_kept.log_softmax(-1)
    if beta == 1.0:  # both renormalised over the support
        return generalized_jsd(log_p_kept, log_q_kept.log_softmax(-1), beta)
    # The teacher renormalised over its support and zero elsewhere, the student whole.
    log_p = torch.full_like(log_q, -math.inf).scatter(-1, support, log_p_kept)
    return generalized_jsd(log_p, log_q, beta)


def generalized_jsd(log_p: torch.Tensor, log_q: torch.Tensor, beta: float) -> torch.Tensor:
    """TRL's generalized JSD per row; in KL(Q || P) a teacher's 0 is the smallest normal fp32."""
    if beta == 0.0:
        return kl_div(log_p, log_q)
    if beta == 1.0:
        return kl_div(log_q, log_p.clamp(min=LOG_TINY))
    log_m = torch.stack([log_p + math.log(beta), log_q + math.log1p(-beta)]).logsumexp(0)
    return beta * kl_div(log_p, log_m) + (1 - beta) * kl_div(log_q, log_m)


def kl_div(log_a: torch.Tensor, log_b: torch.Tensor) -> torch.Tensor:
    """KL(a || b) per row; entries where a is 0 add 0."""
    a = log_a.exp()
    return (torch.special.xlogy(a, a) - a * log_b).sum(-1)


def assert_close(actual: torch.Tensor, expected: torch.Tensor, *, rtol: float = 1e-5) -> None:
    """Relative agreement, with entries near zero judged against the tensor's scale."""
    expected = expected.double()
    atol = rtol * max(expected.abs().max().item(), 1e-30)
    torch.testing.assert_close(actual.double(), expected, rtol=rtol, atol=atol)


def assert_results_close(actual: LossResult, expected: LossResult, *, rtol: float = 1e-5) -> None:
    for name in ("loss", "kl", "ce"):
        value = getattr(actual, name)
        assert value.dtype == torch.float32 and value.dim() == 0, name
        assert_close(value, getattr(expected, name), rtol=rtol)


def grads_of(result: LossResult, *inputs: torch.Tensor) -> tuple[torch.Tensor, ...]:
    return torch.autograd.grad(result.loss, inputs)


def leaf(tensor: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    return tensor.detach().to(dtype).requires_grad_()


@pytest.mark.parametrize("temperature", [0.5, 1.0, 2.0, 8.0])
@pytest.mark.parametrize("alpha", [0.0, 0.3, 1.0])
@pytest.mark.parametrize("top_k", [None, 1, 5, V, V + 10])
def test_logits_form_matches_reference(temperature, alpha, top_k):
    batch = make_batch()
    settings = dict(alpha=alpha, temperature=temperature)
    student, student64 = leaf(batch["student"]), leaf(batch["student"], torch.float64)
    result = distill_loss(
        student, batch["teacher"], batch["labels"], **settings, top_k=top_k, chunk_tokens=3
    )
    expected = reference(
        student64, batch["labels"], teacher=batch["teacher"], top_k=top_k, **settings
    )
    assert_results_close(result, expected)
    assert_close(grads_of(result, student)[0], grads_of(expected, student64)[0])


@pytest.mark.parametrize("temperature", [0.5, 2.0])
@pytest.mark.parametrize("index_dtype", [torch.int64, torch.int32])
def test_sparse_form_equals_dense_top_k(temperature, index_dtype):
    batch = make_batch(seed=1)
    settings = dict(alpha=0.6, temperature=temperature)
    top = batch["teacher"].topk(5, dim=-1)
    dense, sparse = leaf(batch["student"]), leaf(batch["student"])
    expected = distill_loss(dense, batch["teacher"], batch["labels"], top_k=5, **settings)
    result = distill_loss_sparse(
        sparse, top.values, top.indices.to(index_dtype), batch["labels"], **settings
    )
    assert_results_close(result, expected)
    assert_close(grads_of(result, sparse)[0], grads_of(expected, dense)[0])


@pytest.mark.parametrize("beta", [0.0, 0.5, 1.0])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_low_precision_teacher_values_are_upcast(dtype, beta):
    batch = make_batch(seed=2)
    top = batch["teacher"].topk(7, dim=-1)
    values = top.values.to(dtype)
    student, student64 = leaf(batch["student"]), leaf(batch["student"], torch.float64)
    settings = dict(alpha=0.5, temperature=2.0, beta=beta)
    result = distill_loss_sparse(student, values, top.indices, batch["labels"], **settings)
    # The reference sees the same rounded values: the loss adds no rounding of its own.
    teacher = torch.full_like(batch["teacher"], -1e4).scatter(-1, top.indices, values.float())
    expected = reference(
        student64, batch["labels"], teacher=teacher, support=top.indices, **settings
    )
    assert_results_close(result, expected)
    assert_close(grads_of(result, student)[0], grads_of(expected, student64)[0])


@pytest.mark.parametrize("form", ["logits", "sparse", "hidden"])
def test_all_positions_ignored_gives_zero(form):
    batch = make_batch(ignored=1.0)
    settings = dict(alpha=0.5, temperature=2.0)
    student, hidden, weight = leaf(batch["student"]), leaf(batch["hidden"]), leaf(batch["weight"])
    top = batch["teacher"].topk(3, dim=-1)
    if form == "logits":
        result = distill_loss(student, batch["teacher"], batch["labels"], **settings)
        inputs = (student,)
    elif form == "sparse":
        result = distill_loss_sparse(student, top.values, top.indices, batch["labels"], **settings)
        inputs = (student,)
    else:
        result = distill_loss_from_hidden(
            hidden, weight, batch["labels"], teacher_logits=batch["teacher"], **settings
        )
        inputs = (hidden, weight)
    for value in (result.loss, result.kl, result.ce):
        assert value.item() == 0.0
    for grad in grads_of(result, *inputs):
        assert torch.equal(grad, torch.zeros_like(grad))


@pytest.mark.parametrize("chunk_tokens", [1, 2, 5, 1000, None])
def test_chunk_size_does_not_change_results(chunk_tokens):
    batch = make_batch(seed=4)
    settings = dict(alpha=0.4, temperature=2.0, top_k=6)
    whole_student = leaf(batch["student"])
    whole = distill_loss(
        whole_student, batch["teacher"], batch["labels"], chunk_tokens=B * S, **settings
    )
    student, hidden, weight = leaf(batch["student"]), leaf(batch["hidden"]), leaf(batch["weight"])
    result = distill_loss(
        student, batch["teacher"], batch["labels"], chunk_tokens=chunk_tokens, **settings
    )
    assert_results_close(result, whole)
    assert_close(grads_of(result, student)[0], grads_of(whole, whole_student)[0])
    whole_hidden = distill_loss_from_hidden(
        leaf(hidden),
        leaf(weight),
        batch["labels"],
        teacher_logits=batch["teacher"],
        chunk_tokens=B * S,
        **settings,
    )
    result = distill_loss_from_hidden(
        hidden,
        weight,
        batch["labels"],
        teacher_logits=batch["teacher"],
        chunk_tokens=chunk_tokens,
        **settings,
    )
    assert_results_close(result, whole_hidden)


TEACHERS = {
    "dense": lambda t: dict(teacher_logits=t),
    "top_k": lambda t: dict(teacher_logits=t, top_k=4),
    "sparse": lambda t: dict(
        teacher_values=t.topk(4, -1).values.half(), teacher_indices=t.topk(4, -1).indices
    ),
    "none": lambda t: {},
}


@pytest.mark.parametrize("teacher", list(TEACHERS))
@pytest.mark.parametrize("temperature", [0.5, 2.0])
def test_hidden_form_matches_reference(teacher, temperature):
    batch = make_batch(seed=5)
    alpha = 0.0 if teacher == "none" else 0.7
    kwargs = TEACHERS[teacher](batch["teacher"])
    hidden, weight = leaf(batch["hidden"]), leaf(batch["weight"])
    result = distill_loss_from_hidden(
        hidden,
        weight,
        batch["labels"],
        alpha=alpha,
        temperature=temperature,
        chunk_tokens=4,
        **kwargs,
    )
    hidden64, weight64 = leaf(hidden, torch.float64), leaf(weight, torch.float64)
    if teacher == "sparse":
        values, support = kwargs["teacher_values"], kwargs["teacher_indices"]
        ref_teacher = torch.full_like(batch["teacher"], -1e4).scatter(-1, support, values.float())
        ref_teacher_kwargs = dict(teacher=ref_teacher, support=support)
    else:
        ref_teacher_kwargs = dict(teacher=kwargs.get("teacher_logits"), top_k=kwargs.get("top_k"))
    expected = reference(
        hidden64 @ weight64.T,
        batch["labels"],
        alpha=alpha,
        temperature=temperature,
        **ref_teacher_kwargs,
    )
    assert_results_close(result, expected)
    grads64 = grads_of(expected, hidden64, weight64)
    for grad, grad64 in zip(grads_of(result, hidden, weight), grads64):
        assert_close(grad, grad64)


def test_hidden_form_equals_logits_form():
    batch = make_batch(seed=6)
    settings = dict(alpha=0.5, temperature=1.5, top_k=8)
    hidden, weight = leaf(batch["hidden"]), leaf(batch["weight"])
    from_hidden = distill_loss_from_hidden(
        hidden, weight, batch["labels"], teacher_logits=batch["teacher"], **settings
    )
    logits = hidden @ weight.T
    from_logits = distill_loss(logits, batch["teacher"], batch["labels"], **settings)
    assert_results_close(from_hidden, from_logits)
    for a, b in zip(grads_of(from_hidden, hidden, weight), grads_of(from_logits, hidden, weight)):
        assert_close(a, b)


@pytest.mark.parametrize("beta", [0.0, 0.5, 1.0])
@pytest.mark.parametrize("layout", ["shifted slice", "flat", "three dims"])
def test_any_leading_shape_and_strided_inputs(layout, beta):
    batch = make_batch(seed=12)
    student, teacher, labels = batch["student"], batch["teacher"], batch["labels"]
    if layout == "shifted slice":  # how a caller shifts: logits[:, :-1] predicts labels[:, 1:]
        student, teacher, labels = student[:, :-1], teacher[:, :-1], labels[:, 1:]
    elif layout == "flat":
        student, teacher = student.reshape(-1, V), teacher.reshape(-1, V)
        labels = labels.reshape(-1)
    else:
        student, teacher = student.reshape(1, B, S, V), teacher.reshape(1, B, S, V)
        labels = labels.reshape(1, B, S)
    base = leaf(batch["student"])
    view = base[:, :-1] if layout == "shifted slice" else base.reshape(student.shape)
    settings = dict(alpha=0.5, temperature=2.0, top_k=5, beta=beta)
    result = distill_loss(view, teacher, labels, chunk_tokens=4, **settings)
    student64 = leaf(student, torch.float64)
    expected = reference(student64, labels, teacher=teacher, **settings)
    assert_results_close(result, expected)
    grad = grads_of(result, view)[0]
    assert grad.shape == student.shape
    assert_close(grad, grads_of(expected, student64)[0])


def test_second_backward_is_refused():
    batch = make_batch(seed=13)
    student = leaf(batch["student"])
    result = distill_loss(student, batch["teacher"], batch["labels"], alpha=0.5, temperature=2.0)
    result.loss.backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="inplace"):
        result.loss.backward()


def test_autocast_does_not_lower_the_precision():
    batch = make_batch(seed=14)
    hidden, weight = leaf(batch["hidden"]), leaf(batch["weight"])
    settings = dict(teacher_logits=batch["teacher"], alpha=0.5, temperature=2.0)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        result = distill_loss_from_hidden(hidden, weight, batch["labels"], **settings)
    expected = distill_loss_from_hidden(hidden, weight, batch["labels"], **settings)
    assert_results_close(result, expected)


def test_alpha_zero_needs_no_teacher():
    batch = make_batch(seed=7)
    expected = reference(batch["student"], batch["labels"], alpha=0.0, temperature=1.0)
    from_logits = distill_loss(batch["student"], None, batch["labels"], alpha=0.0, temperature=1.0)
    from_hidden = distill_loss_from_hidden(
        batch["hidden"], batch["weight"], batch["labels"], alpha=0.0, temperature=1.0
    )
    assert_results_close(from_logits, expected)
    assert from_hidden.kl.item() == 0.0
    assert_close(from_hidden.loss, from_hidden.ce)


def test_kl_is_nonnegative_and_zero_for_the_teacher_itself():
    batch = make_batch(seed=8)
    for temperature in (0.5, 1.0, 4.0):
        result = distill_loss(
            batch["student"], batch["teacher"], batch["labels"], alpha=1.0, temperature=temperature
        )
        assert result.kl.item() > 0.0
        itself = distill_loss(
            batch["teacher"], batch["teacher"], batch["labels"], alpha=1.0, temperature=temperature
        )
        assert itself.kl.item() == 0.0


def test_teacher_logits_of_minus_infinity_are_handled():
    batch = make_batch(seed=9)
    teacher = batch["teacher"].clone()
    teacher[..., -3:] = float("-inf")  # e.g. padded vocabulary rows masked out
    student = leaf(batch["student"])
    result = distill_loss(student, teacher, batch["labels"], alpha=1.0, temperature=2.0)
    expected = reference(
        batch["student"], batch["labels"], teacher=teacher, alpha=1.0, temperature=2.0
    )
    assert_results_close(result, expected)
    assert torch.isfinite(grads_of(result, student)[0]).all()


def test_gradient_is_scaled_by_the_upstream_gradient_and_terms_are_detached():
    batch = make_batch(seed=10)
    student = leaf(batch["student"])
    result = distill_loss(student, batch["teacher"], batch["labels"], alpha=0.5, temperature=2.0)
    (unit,) = torch.autograd.grad(result.loss, student, retain_graph=False)
    result = distill_loss(student, batch["teacher"], batch["labels"], alpha=0.5, temperature=2.0)
    (tripled,) = torch.autograd.grad(3.0 * result.loss, student)
    assert_close(tripled, 3.0 * unit)
    assert not result.kl.requires_grad and not result.ce.requires_grad


def test_no_gradient_work_without_grad():
    batch = make_batch(seed=11)
    student = leaf(batch["student"])
    with torch.no_grad():
        result = distill_loss(
            student, batch["teacher"], batch["labels"], alpha=0.5, temperature=2.0
        )
    assert result.loss.grad_fn is None
    result = distill_loss(
        batch["student"], batch["teacher"], batch["labels"], alpha=0.5, temperature=2.0
    )
    assert not result.loss.requires_grad


BAD_ARGUMENTS = {
    "alpha above 1": (dict(alpha=1.5), "alpha"),
    "alpha below 0": (dict(alpha=-0.1), "alpha"),
    "zero temperature": (dict(temperature=0.0), "temperature"),
    "infinite temperature": (dict(temperature=float("inf")), "temperature"),
    "beta above 1": (dict(beta=1.5), "beta"),
    "beta not a number": (dict(beta=float("nan")), "beta"),
    "top_k zero": (dict(top_k=0), "top_k"),
    "chunk_tokens zero": (dict(chunk_tokens=0), "chunk_tokens"),
    "teacher missing": (dict(teacher_logits=None), "needs a teacher"),
    "teacher shape": (dict(teacher_logits=torch.zeros(B, S, V + 1)), "teacher_logits shape"),
    "labels shape": (dict(labels=torch.zeros(B, S + 1, dtype=torch.long)), "labels shape"),
    "float labels": (dict(labels=torch.zeros(B, S)), "integer"),
    "teacher on another device": (
        dict(teacher_logits=torch.zeros(B, S, V, device="meta")),
        "teacher_logits is on meta",
    ),
}


@pytest.mark.parametrize("case", list(BAD_ARGUMENTS))
def test_bad_arguments_raise_value_error(case):
    batch = make_batch()
    kwargs = dict(
        student_logits=batch["student"],
        teacher_logits=batch["teacher"],
        labels=batch["labels"],
        alpha=0.5,
        temperature=1.0,
    )
    change, message = BAD_ARGUMENTS[case]
    with pytest.raises(ValueError, match=message):
        distill_loss(**{**kwargs, **change})


BAD_SPARSE_AND_HIDDEN = {
    "sparse shapes": (
        lambda b, top: distill_loss_sparse(
            b["student"], top.values, top.indices[..., :2], b["labels"], alpha=0.5, temperature=1.0
        ),
        "teacher_values",
    ),
    "float indices": (
        lambda b, top: distill_loss_sparse(
            b["student"], top.values, top.values, b["labels"], alpha=0.5, temperature=1.0
        ),
        "int64 or int32",
    ),
    "weight width": (
        lambda b, top: distill_loss_from_hidden(
            b["hidden"], b["weight"][:, :-1], b["labels"], alpha=0.0, temperature=1.0
        ),
        "weight",
    ),
    "two teachers": (
        lambda b, top: distill_loss_from_hidden(
            b["hidden"],
            b["weight"],
            b["labels"],
            teacher_logits=b["teacher"],
            teacher_values=top.values,
            teacher_indices=top.indices,
            alpha=0.5,
            temperature=1.0,
        ),
        "not both",
    ),
    "values without indices": (
        lambda b, top: distill_loss_from_hidden(
            b["hidden"],
            b["weight"],
            b["labels"],
            teacher_values=top.values,
            alpha=0.5,
            temperature=1.0,
        ),
        "go together",
    ),
    "top_k with sparse": (
        lambda b, top: distill_loss_from_hidden(
            b["hidden"],
            b["weight"],
            b["labels"],
            teacher_values=top.values,
            teacher_indices=top.indices,
            top_k=2,
            alpha=0.5,
            temperature=1.0,
        ),
        "top_k",
    ),
}


@pytest.mark.parametrize("case", list(BAD_SPARSE_AND_HIDDEN))
def test_bad_sparse_and_hidden_arguments_raise_value_error(case):
    batch = make_batch()
    call, message = BAD_SPARSE_AND_HIDDEN[case]
    with pytest.raises(ValueError, match=message):
        call(batch, batch["teacher"].topk(3, dim=-1))


def test_every_problem_is_reported_at_once():
    batch = make_batch()
    with pytest.raises(ValueError) as raised:
        distill_loss(batch["student"], None, batch["labels"], alpha=2.0, temperature=-1.0)
    assert "alpha must be" in str(raised.value) and "temperature must be" in str(raised.value)


# ---------------------------------------------------------------------------------------------
# The generalized JSD (beta) and a truncated teacher


def trl_generalized_jsd(
    student: torch.Tensor, teacher: torch.Tensor, beta: float, temperature: float
) -> torch.Tensor:
    """TRL's generalized_jsd_loss per position, written as TRL writes it (F.kl_div)."""
    student_log_probs = torch.log_softmax(student / temperature, -1)
    teacher_log_probs = torch.log_softmax(teacher / temperature, -1)

    def kl(input: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return F.kl_div(input, target, reduction="none", log_target=True)

    if beta == 0:
        return kl(student_log_probs, teacher_log_probs).sum(-1)
    if beta == 1:
        return kl(teacher_log_probs, student_log_probs).sum(-1)
    mixture_log_probs = torch.logsumexp(
        torch.stack([student_log_probs + math.log(1 - beta), teacher_log_probs + math.log(beta)]),
        0,
    )
    return (
        beta * kl(mixture_log_probs, teacher_log_probs)
        + (1 - beta) * kl(mixture_log_probs, student_log_probs)
    ).sum(-1)


@pytest.mark.parametrize("beta", BETAS)
def test_reference_is_trl_generalized_jsd(beta):
    batch = make_batch(seed=20, ignored=0.0)
    student, teacher = batch["student"].double(), batch["teacher"].double()
    expected = trl_generalized_jsd(student, teacher, beta, 2.0).mean() * 4.0
    result = reference(
        student, batch["labels"], teacher=teacher, alpha=1.0, temperature=2.0, beta=beta
    )
    assert_close(result.kl, expected, rtol=1e-12)


@pytest.mark.parametrize("temperature", [0.5, 1.0, 3.0])
@pytest.mark.parametrize("alpha", [0.3, 1.0])
@pytest.mark.parametrize("top_k", [None, 1, 5])
@pytest.mark.parametrize("beta", BETAS)
def test_divergences_in_the_logits_form_match_reference(beta, top_k, alpha, temperature):
    batch = make_batch(seed=21)
    settings = dict(alpha=alpha, temperature=temperature, beta=beta)
    student, student64 = leaf(batch["student"]), leaf(batch["student"], torch.float64)
    result = distill_loss(
        student, batch["teacher"], batch["labels"], top_k=top_k, chunk_tokens=3, **settings
    )
    expected = reference(
        student64, batch["labels"], teacher=batch["teacher"], top_k=top_k, **settings
    )
    assert_results_close(result, expected)
    assert_close(grads_of(result, student)[0], grads_of(expected, student64)[0])


def sparse_teacher(teacher: torch.Tensor, k: int) -> dict[str, torch.Tensor]:
    """The top-K values and ids of ``teacher``."""
    top = teacher.topk(k, dim=-1)
    return dict(teacher_values=top.values, teacher_indices=top.indices)


@pytest.mark.parametrize("temperature", [0.5, 2.0])
@pytest.mark.parametrize("beta", BETAS)
def test_divergences_in_the_sparse_form_match_reference(beta, temperature):
    batch = make_batch(seed=22)
    settings = dict(alpha=0.6, temperature=temperature, beta=beta)
    teacher = sparse_teacher(batch["teacher"], 6)
    student, student64 = leaf(batch["student"]), leaf(batch["student"], torch.float64)
    result = distill_loss_sparse(
        student,
        teacher["teacher_values"],
        teacher["teacher_indices"],
        batch["labels"],
        chunk_tokens=4,
        **settings,
    )
    expected = reference(
        student64,
        batch["labels"],
        teacher=batch["teacher"],
        support=teacher["teacher_indices"],
        **settings,
    )
    assert_results_close(result, expected)
    grad = grads_of(result, student)[0]
    assert_close(grad, grads_of(expected, student64)[0])
    dense_student = leaf(batch["student"])
    dense = distill_loss(dense_student, batch["teacher"], batch["labels"], top_k=6, **settings)
    assert_results_close(result, dense)
    assert_close(grad, grads_of(dense, dense_student)[0])


@pytest.mark.parametrize("teacher", ["dense", "top_k", "sparse"])
@pytest.mark.parametrize("beta", BETAS)
def test_divergences_in_the_hidden_form_match_reference(beta, teacher):
    batch = make_batch(seed=23)
    settings = dict(alpha=0.7, temperature=1.5, beta=beta)
    if teacher == "sparse":
        kwargs = sparse_teacher(batch["teacher"], 5)
        ref_teacher = dict(support=kwargs["teacher_indices"])
    else:
        kwargs = dict(teacher_logits=batch["teacher"], top_k=5 if teacher == "top_k" else None)
        ref_teacher = dict(top_k=kwargs["top_k"])
    hidden, weight = leaf(batch["hidden"]), leaf(batch["weight"])
    result = distill_loss_from_hidden(
        hidden, weight, batch["labels"], chunk_tokens=4, **kwargs, **settings
    )
    hidden64, weight64 = leaf(hidden, torch.float64), leaf(weight, torch.float64)
    expected = reference(
        hidden64 @ weight64.T, batch["labels"], teacher=batch["teacher"], **ref_teacher, **settings
    )
    assert_results_close(result, expected)
    grads64 = grads_of(expected, hidden64, weight64)
    for grad, grad64 in zip(grads_of(result, hidden, weight), grads64):
        assert_close(grad, grad64)


@pytest.mark.parametrize("beta", BETAS)
def test_a_teacher_that_keeps_the_whole_vocabulary_equals_the_full_result(beta):
    batch = make_batch(seed=24)
    settings = dict(alpha=0.5, temperature=2.0, beta=beta)
    full_student = leaf(batch["student"])
    full = distill_loss(full_student, batch["teacher"], batch["labels"], **settings)
    full_grad = grads_of(full, full_student)[0]
    for top_k in (V, V + 10):
        student = leaf(batch["student"])
        result = distill_loss(student, batch["teacher"], batch["labels"], top_k=top_k, **settings)
        assert_results_close(result, full)
        assert_close(grads_of(result, student)[0], full_grad)
    student = leaf(batch["student"])
    teacher = sparse_teacher(batch["teacher"], V)
    result = distill_loss_sparse(
        student, teacher["teacher_values"], teacher["teacher_indices"], batch["labels"], **settings
    )
    assert_results_close(result, full)
    assert_close(grads_of(result, student)[0], full_grad)


def test_reverse_kl_with_renormalize_gives_no_gradient_off_the_support():
    batch = make_batch(seed=26, ignored=0.0)
    student = leaf(batch["student"])
    result = distill_loss(
        student, batch["teacher"], batch["labels"], alpha=1.0, temperature=2.0, top_k=4, beta=1.0
    )
    grad = grads_of(result, student)[0]
    off_support = torch.ones_like(grad, dtype=torch.bool).scatter(
        -1, batch["teacher"].topk(4, dim=-1).indices, False
    )
    assert torch.equal(grad[off_support], torch.zeros_like(grad[off_support]))
    assert grad.abs().max() > 0


@pytest.mark.parametrize("top_k", [None, 4, V - 1])
@pytest.mark.parametrize("beta", BETAS)
def test_masked_vocabulary_entries_stay_finite_and_match_reference(beta, top_k):
    batch = make_batch(seed=27)
    teacher = batch["teacher"].clone()
    teacher[..., -3:] = float("-inf")  # e.g. padded vocabulary rows; top_k = V - 1 keeps two
    settings = dict(alpha=0.8, temperature=2.0, beta=beta, top_k=top_k)
    student, student64 = leaf(batch["student"]), leaf(batch["student"], torch.float64)
    result = distill_loss(student, teacher, batch["labels"], **settings)
    expected = reference(student64, batch["labels"], teacher=teacher, **settings)
    assert_results_close(result, expected)
    grad = grads_of(result, student)[0]
    assert torch.isfinite(grad).all()
    assert_close(grad, grads_of(expected, student64)[0])


@pytest.mark.parametrize("beta", BETAS)
def test_every_divergence_with_all_positions_ignored_gives_zero(beta):
    batch = make_batch(ignored=1.0)
    settings = dict(alpha=0.5, temperature=2.0, beta=beta)
    hidden, weight = leaf(batch["hidden"]), leaf(batch["weight"])
    for teacher in (
        dict(teacher_logits=batch["teacher"]),
        dict(teacher_logits=batch["teacher"], top_k=3),
        sparse_teacher(batch["teacher"], 3),
    ):
        result = distill_loss_from_hidden(hidden, weight, batch["labels"], **teacher, **settings)
        for value in (result.loss, result.kl, result.ce):
            assert value.item() == 0.0
        for grad in grads_of(result, hidden, weight):
            assert torch.equal(grad, torch.zeros_like(grad))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("beta", BETAS)
def test_divergences_of_low_precision_logits_use_fp32_math(beta, dtype):
    """Every divergence (beta 0: the classic loss) on fp16/bf16 logits."""
    batch = make_batch(seed=28)
    student, teacher = leaf(batch["student"], dtype), batch["teacher"].to(dtype)
    student64 = leaf(student, torch.float64)
    settings = dict(alpha=0.3, temperature=2.0, top_k=4, beta=beta)
    result = distill_loss(student, teacher, batch["labels"], **settings)
    expected = reference(student64, batch["labels"], teacher=teacher, **settings)
    assert_results_close(result, expected)
    grad = grads_of(result, student)[0]
    assert grad.dtype == dtype
    assert_close(grad, grads_of(expected, student64)[0], rtol=1e-2)  # rounded once, to dtype


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("beta", BETAS)
def test_divergences_of_a_low_precision_hidden_form_use_fp32_math(beta, dtype):
    batch = make_batch(seed=32)
    hidden, weight = leaf(batch["hidden"], dtype), leaf(batch["weight"], dtype)
    teacher = sparse_teacher(batch["teacher"].to(dtype).float(), 5)
    settings = dict(alpha=0.6, temperature=2.0, beta=beta)
    result = distill_loss_from_hidden(hidden, weight, batch["labels"], **teacher, **settings)
    hidden64, weight64 = leaf(hidden, torch.float64), leaf(weight, torch.float64)
    expected = reference(
        hidden64 @ weight64.T,
        batch["labels"],
        teacher=batch["teacher"].to(dtype),
        support=teacher["teacher_indices"],
        **settings,
    )
    assert_results_close(result, expected)
    grads = grads_of(result, hidden, weight)
    assert [grad.dtype for grad in grads] == [dtype, dtype]
    for grad, grad64 in zip(grads, grads_of(expected, hidden64, weight64)):
        assert_close(grad, grad64, rtol=1e-2)  # rounded once, to dtype


@pytest.mark.parametrize("temperature", [1e2, 1e4])
@pytest.mark.parametrize("top_k", [None, 4])
@pytest.mark.parametrize("beta", BETAS)
def test_huge_temperatures_stay_finite_and_keep_their_gradient(beta, top_k, temperature):
    batch = make_batch(seed=29)
    settings = dict(alpha=0.5, temperature=temperature, beta=beta, top_k=top_k)
    student, student64 = leaf(batch["student"]), leaf(batch["student"], torch.float64)
    result = distill_loss(student, batch["teacher"], batch["labels"], **settings)
    expected = reference(student64, batch["labels"], teacher=batch["teacher"], **settings)
    for value in (result.loss, result.kl, result.ce):
        assert torch.isfinite(value)
    # The divergence shrinks as 1 / T^2 below its fp32 terms, which are rounded to ~1e-7: at
    # T = 1e4 its value is rounding, while its gradient T * (w - Q * W) keeps its digits.
    if temperature <= 1e2:
        assert_close(result.kl, expected.kl, rtol=2e-3)
    assert_close(grads_of(result, student)[0], grads_of(expected, student64)[0], rtol=1e-3)


@pytest.mark.parametrize("beta", [1e-6, 1 - 1e-6])
def test_betas_next_to_the_ends_are_finite_and_small(beta):
    batch = make_batch(seed=30)
    student, student64 = leaf(batch["student"]), leaf(batch["student"], torch.float64)
    settings = dict(alpha=1.0, temperature=1.0, beta=beta)
    result = distill_loss(student, batch["teacher"], batch["labels"], **settings)
    expected = reference(student64, batch["labels"], teacher=batch["teacher"], **settings)
    # The mixture tends to 0 at both ends (as in TRL): here it is ~beta * (1 - beta) * ...
    assert 0 <= result.kl.item() < 1e-3
    assert_close(result.kl, expected.kl, rtol=1e-2)
    assert_close(grads_of(result, student)[0], grads_of(expected, student64)[0], rtol=1e-2)


QWEN_VOCAB = 151_936
DEFAULT_CHUNKS = {  # (form, teacher, beta): positions per (block, chunk) on a CPU at V = 151,936
    ("logits", "dense", 0.0): (58, 58),  # 136 MiB over 4 [chunk, V] fp32 tensors
    ("logits", "dense", 0.5): (46, 46),  # 5
    ("logits", "sparse", 0.5): (78, 78),  # 3
    ("logits", "none", 0.0): (117, 117),  # 2
    ("hidden", "dense", 1.0): (331, 58),  # a 192 MiB [block, V] buffer; chunks as above
    ("hidden", "dense", 0.5): (331, 46),
    ("hidden", "sparse", 0.0): (331, 78),
    ("hidden", "sparse", 1.0): (331, 117),  # renormalised reverse KL: the top-K logits only
}


@pytest.mark.parametrize("case", list(DEFAULT_CHUNKS))
def test_default_chunks_fit_a_memory_budget(case):
    form, kind, beta = case
    rows = torch.empty(4, QWEN_VOCAB, device="meta")
    inputs = {
        "dense": TeacherInputs(logits=rows),
        "sparse": TeacherInputs(values=rows[:, :64], indices=rows[:, :64].long()),
        "none": TeacherInputs(),
    }[kind]
    teacher = Teacher.build(inputs, top_k=None, vocab=QWEN_VOCAB)
    student = LogitsStudent if form == "logits" else HiddenStudent
    sizes = chunk_sizes(
        student,
        teacher,
        beta=beta,
        vocab=QWEN_VOCAB,
        device=torch.device("cpu"),
        chunk_tokens=None,
    )
    assert sizes == DEFAULT_CHUNKS[case]
    explicit = chunk_sizes(
        student, teacher, beta=beta, vocab=QWEN_VOCAB, device=torch.device("cpu"), chunk_tokens=8
    )
    assert explicit == (8, 8)  # an explicit chunk_tokens sets the block; chunks fit in it


@pytest.mark.parametrize("teacher", ["dense", "top_k", "sparse"])
@pytest.mark.parametrize("beta", [0.0, 0.5, 1.0])
def test_hidden_blocks_split_into_chunks_match_reference(monkeypatch, beta, teacher):
    # Chunks of 2 or 3 positions within blocks of 5: at V = 33 the real budget never splits one.
    monkeypatch.setitem(_chunks._CHUNK_BUDGET, "cpu", 3 * 4 * V * 4)
    batch = make_batch(seed=33)
    kwargs = {
        "dense": dict(teacher_logits=batch["teacher"]),
        "top_k": dict(teacher_logits=batch["teacher"], top_k=4),
        "sparse": sparse_teacher(batch["teacher"], 4),
    }[teacher]
    settings = dict(alpha=0.6, temperature=2.0, beta=beta)
    hidden, weight = leaf(batch["hidden"]), leaf(batch["weight"])
    result = distill_loss_from_hidden(
        hidden, weight, batch["labels"], chunk_tokens=5, **kwargs, **settings
    )
    hidden64, weight64 = leaf(hidden, torch.float64), leaf(weight, torch.float64)
    ref_teacher = dict(top_k=kwargs.get("top_k"), support=kwargs.get("teacher_indices"))
    expected = reference(
        hidden64 @ weight64.T, batch["labels"], teacher=batch["teacher"], **ref_teacher, **settings
    )
    assert_results_close(result, expected)
    grads64 = grads_of(expected, hidden64, weight64)
    for grad, grad64 in zip(grads_of(result, hidden, weight), grads64):
        assert_close(grad, grad64)
