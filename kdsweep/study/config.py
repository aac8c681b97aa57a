"""What a study is: frozen dataclasses that mirror the study file's YAML key for key.

Their field comments are the reference (docs/study-file.md holds them, kept true by a test).
``reader`` reads a file into them and validates it. This module imports neither torch nor
transformers.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from kdsweep.redact import redact_tree
from kdsweep.study.measures import BY_NAME
from kdsweep.study.space import Param, SearchConfig, finite_top_ks, may_be_positive

SAMPLERS = ("tpe", "gp", "random", "grid")
PRUNERS = ("median", "hyperband", "none")
PRECISIONS = ("auto", "bf16", "fp16", "fp32")
DATA_FORMATS = ("auto", "text", "messages", "prompt_completion", "sharegpt")
REASONING = ("train", "strip")  # data.reasoning
# eval.answer's named patterns; any other value is a regular expression
WHOLE_ANSWER, GSM8K_ANSWER, BOXED_ANSWER = "whole", "gsm8k", "boxed"
SELECTIONS = ("best", "last")
DTYPES = ("auto", "float32", "bfloat16", "float16")
ATTENTIONS = ("sdpa", "eager", "flash_attention_2")  # transformers' attn_implementation names
ALL_LINEAR = "all-linear"  # peft's LoRA target: every linear layer but the output layer


@dataclass(frozen=True)
class ModelConfig:
    """A teacher or student: hub id, local folder, or ``demo:teacher`` / ``demo:student``."""

    name: str = ""
    revision: str | None = None
    # weights dtype; "auto": a teacher in bf16 where bf16 is fast (a GPU, a CPU with AMX), else
    # fp32; a student in fp32 (its master weights)
    dtype: str = "auto"
    # a GGUF file in the folder or hub repo `name`, read by transformers (the gguf package),
    # dequantized and kept as a plain model folder in the cache
    gguf_file: str | None = None

    @property
    def label(self) -> str:
        """How the model is named in a report and a run's params."""
        return f"{self.name} ({self.gguf_file})" if self.gguf_file else self.name


@dataclass(frozen=True)
class LoraConfig:
    """The LoRA adapter of trials whose search.lora_rank is above 0, built with peft."""

    # the adapter's update is scaled by alpha / rank: alpha fixed, the best learning rate moves
    # little with the rank (LoRA Without Regret, Thinking Machines, 2025)
    alpha: float = 32.0
    dropout: float = 0.0
    # all-linear (peft's: every linear layer but the output layer), or a list of module names
    target_modules: str | tuple[str, ...] = ALL_LINEAR
    # an adapter trains at search.learning_rate times this: LoRA's best rate is about 10 times
    # full fine-tuning's (Tinker: 1e-3 against 1e-4)
    learning_rate_scale: float = 10.0

    def learning_rate(self, learning_rate: float, rank: int) -> float:
        """The rate a trial trains at: ``search.learning_rate`` for full fine-tuning (rank 0),
        times ``learning_rate_scale`` for an adapter."""
        return learning_rate * self.learning_rate_scale if rank else learning_rate


@dataclass(frozen=True)
class FromTeacherConfig:
    """A student built from the teacher: its embeddings, final norm and output layer, and the
    decoder layers listed (DistilBERT's and Minitron's depth pruning), built once and cached."""

    # the teacher's decoder layers the student keeps, in order, e.g. [0, 6, 12, 18, 24, 29]
    # (counted from 0); none: the student is student.name
    layers: tuple[int, ...] = ()


@dataclass(frozen=True)
class StudentConfig(ModelConfig):
    """The student: a model as the teacher is, or one built from the teacher's layers; and the
    LoRA adapter its LoRA trials train."""

    from_teacher: FromTeacherConfig = FromTeacherConfig()
    lora: LoraConfig = LoraConfig()

    @property
    def built_from_teacher(self) -> bool:
        return bool(self.from_teacher.layers)

    @property
    def label(self) -> str:
        if self.built_from_teacher:
            return f"the teacher's layers {', '.join(map(str, self.from_teacher.layers))}"
        return super().label


@dataclass(frozen=True)
class DataConfig:
    """Where the rows come from, what shape they have, and how they become tokens."""

    dataset: str = ""  # hub id, or a local file (jsonl/json/parquet/csv) or folder of them
    # a hub dataset's subset (its configuration), e.g. math of open-r1/Mixture-of-Thoughts
    subset: str | None = None
    train_split: str = "train"
    # the validation split: pruning, the sampler, each trial's best checkpoint and the best trial
    eval_split: str = "test"
    # scored once, for the finalists only (the best distilled and baseline configurations, the
    # seed check's runs, the teacher): the verdict's numbers, from rows nothing was selected on
    test_split: str | None = None
    # auto: decided by the columns, as TRL does (messages, prompt + completion, conversations, else
    # text_field); or text, messages, prompt_completion, sharegpt
    format: str = "auto"
    # text rows: guanaco's ### Human: / ### Assistant: turns, or plain text
    text_field: str = "text"
    # conversations of {role, content}; roles system, user, assistant
    messages_field: str = "messages"
    # prompt-completion rows: both text, or both lists of {role, content}
    prompt_field: str = "prompt"
    completion_field: str = "completion"
    # ShareGPT: {from, value} turns (human, gpt, system)
    conversations_field: str = "conversations"
    # a Jinja chat template, or a file holding one; default: the student tokenizer's
    chat_template: str | None = None
    # passed to the template, e.g. {enable_thinking: false}
    chat_template_kwargs: dict = field(default_factory=dict)
    # an assistant turn's reasoning (a reasoning_content, reasoning or thinking key, or
    # <think>...</think> in its content): train (rendered where the chat template puts it, scored
    # with the answer) or strip (taken off: the answers alone are trained on)
    reasoning: str = REASONING[0]
    # each assistant turn a row of its own: the conversation up to it, that turn alone scored,
    # rendered as the template renders a last turn (as it is generated); false: each conversation
    # once, every turn as the template renders it (Qwen3's leaves earlier turns' reasoning out)
    each_turn_as_last: bool = False
    max_length: int = 512
    assistant_only: bool = True  # score only the answers (each with the token that ends it)
    group_by_length: bool = True  # batch rows of similar length so little compute goes to padding


@dataclass(frozen=True)
class TrainConfig:
    """Fixed training settings shared by every trial."""

    max_steps: int = 100  # optimizer steps per trial
    batch_size: int = 8
    # micro-batches per optimizer step, whose loss is the mean over all the tokens they score
    grad_accum_steps: int = 1
    warmup_ratio: float = 0.05
    weight_decay: float = 0.0
    max_grad_norm: float = 1.0
    # autocast's dtype; auto: bf16 where it is faster than fp32 (a GPU, a CPU with AMX), else fp32
    precision: str = "auto"
    eval_every: int = 50  # steps between evaluations (pruning decisions, checkpoints to select)
    # best: a trial's value is its best evaluation, at its best checkpoint (the step is kept as
    # best_step; accuracy is measured there, save_best keeps it); last: its last evaluation
    select: str = "best"
    # where trials' resume checkpoints and finalists' best checkpoints are kept (a folder every
    # machine sees, for many machines); default: under the cache
    checkpoint_dir: str | None = None
    # steps between resume checkpoints; None: at each evaluation; 0: none (a preempted worker
    # still writes one)
    checkpoint_every: int | None = None
    eval_batch_size: int = 16
    log_every: int = 10
    seed: int = 0
    device: str = "auto"  # auto: CUDA when present, else CPU
    # torch's CPU threads; tiny models run fastest on 1 (None: torch's default)
    threads: int | None = None
    # positions per loss block; None: sized by the loss from a memory budget
    loss_chunk_tokens: int | None = None
    # every top_k finite: the teacher runs once per study, into a top-K cache; false: online
    teacher_cache: bool = True
    # a trial out of GPU memory is retried with half the micro-batch and twice the accumulation
    oom_retry: bool = False
    # the student's decoder layers recompute their activations in the backward pass instead of
    # keeping them: less memory for about a third more compute (transformers' gradient
    # checkpointing, non-reentrant; TRL turns it on by default)
    gradient_checkpointing: bool = False
    # both models' attention: sdpa (torch's scaled_dot_product_attention), eager, or
    # flash_attention_2 (the flash-attn package, on a CUDA GPU)
    attn_implementation: str = "sdpa"
    # On-policy steps (search.lmbda > 0): how the student samples its own completions.
    generation_temperature: float = 1.0
    generation_max_new_tokens: int = 64


@dataclass(frozen=True)
class EvalConfig:
    """Task accuracy: the student greedy-decodes the last answer of each held-out row from its
    prompt, scored by exact match (after whitespace normalisation) and ROUGE-L."""

    accuracy: bool = False  # decode and score answers (metrics exact_match and rouge_l)
    max_rows: int = 200  # the eval split's first rows that end with an answer
    max_new_tokens: int = 64  # longer answers are cut
    batch_size: int = 32  # prompts decoded together (left-padded, with the KV cache)
    # at every evaluation, not only the last (always, for an accuracy objective)
    every_eval: bool = False
    # what exact match compares, in the generation (after its reasoning) and the reference alike:
    # whole (the answer), gsm8k (the number after ####), boxed (the last \boxed{...}), or a
    # regular expression (its first group, else the whole match; the last match counts)
    answer: str = WHOLE_ANSWER


@dataclass(frozen=True)
class SeedCheckConfig:
    """The seed check: after the sweep, the best configurations train again with other seeds."""

    # the best distilled configurations trained again (with the best baseline); 0: no check
    top: int = 0
    seeds: int = 2  # other training seeds for each: train.seed + 1, + 2, ...


@dataclass(frozen=True)
class SamplerConfig:
    """How the sweep's trials are drawn. TPE's settings are explicit, so a study samples the same
    way on every Optuna version kdsweep supports (Optuna 5 changed their defaults)."""

    name: str = "tpe"  # tpe, gp (a Gaussian process), random or grid
    seed: int | None = 0  # seeds every trial's draws (by its number), so reruns draw the same
    n_startup_trials: int = 5  # tpe, gp: trials drawn at random before the model takes over
    multivariate: bool = True  # tpe: model the parameters jointly, not one by one
    # tpe: treat running trials as bad, so parallel workers explore apart
    constant_liar: bool = True

    def acting(self) -> dict:
        """The settings that act (TPE's own for TPE only), as the parent run records them."""
        settings = {"name": self.name, "seed": self.seed}
        if self.name in ("tpe", "gp"):
            settings["n_startup_trials"] = self.n_startup_trials
        if self.name == "tpe":
            settings |= {"multivariate": self.multivariate, "constant_liar": self.constant_liar}
        return settings


@dataclass(frozen=True)
class PrunerConfig:
    name: str = "median"
    n_startup_trials: int = 2  # median: trials of an arm to finish before any of it is pruned
    n_warmup_steps: int = 0  # median: steps before a trial can be pruned


@dataclass(frozen=True)
class TrackingConfig:
    uri: str | None = None  # MLflow tracking URI; MLFLOW_TRACKING_URI wins over it
    experiment: str | None = None  # defaults to the study name
    system_metrics: bool = True  # CPU, memory and the trial's own GPU on every trial run
    system_metrics_interval: float = 5.0  # seconds between samples


@dataclass(frozen=True)
class StudyConfig:
    name: str = ""
    # a measure, or a list of them (a multi-objective study, its first deciding the verdict);
    # student_ppl, ppl_ratio, kl_to_teacher, exact_match, rouge_l, device_seconds, ...
    # (measures.MEASURES), each with its direction
    objective: str | tuple[str, ...] = "student_ppl"
    # ceilings on measures that are better lower, e.g. {peak_memory_gb: 70, device_seconds: 3600}:
    # the sampler learns what is feasible, the best trial and the report consider feasible ones
    constraints: dict = field(default_factory=dict)
    n_trials: int = 10  # total finished trials the study should hold, across all runs and workers
    storage: str | None = None  # Optuna storage URL; default sqlite:///kdsweep.db here
    sampler: SamplerConfig = SamplerConfig()
    pruner: PrunerConfig = PrunerConfig()
    tracking: TrackingConfig = TrackingConfig()
    teacher: ModelConfig = ModelConfig()
    student: StudentConfig = StudentConfig()
    data: DataConfig = DataConfig()
    train: TrainConfig = TrainConfig()
    eval: EvalConfig = EvalConfig()
    search: SearchConfig = SearchConfig()
    # Parameter sets run first, e.g. {alpha: 0} (plain fine-tuning); {alpha: 0, trials: 3} also
    # searches the parameters it does not fix (its learning rate) over 3 trials of its own.
    baselines: tuple[dict, ...] = ()
    seed_check: SeedCheckConfig = SeedCheckConfig()
    # after the sweep, the best distilled configuration trained again at alpha 0 with everything
    # else equal (learning rate, steps, seed, student form): the verdict separates the teacher's
    # share of the winner's lead from what the search's extra draws bought
    control: bool = True
    # the same error failing this many trials in a row stops the sweep
    max_consecutive_failures: int = 3
    save_best: bool = False  # keep the best trial's student as an MLflow model
    # with save_best: the MLflow Model Registry name; alias "champion" follows the best
    register_as: str | None = None
    report_top_n: int = 5
    base_dir: str = field(default=".", metadata={"internal": True})  # folder of the study file
    source: str = field(default="STUDY.yaml", metadata={"internal": True})  # the file as given

    @property
    def storage_url(self) -> str:
        return self.storage or "sqlite:///kdsweep.db"

    @property
    def objectives(self) -> tuple[str, ...]:
        """Every objective, in the order the study file lists them."""
        return (self.objective,) if isinstance(self.objective, str) else tuple(self.objective)

    @property
    def primary_objective(self) -> str:
        """The first objective: it chooses each trial's checkpoint, the best trial, the
        finalists and the seed check's configurations, and decides the verdict."""
        return self.objectives[0]

    @property
    def direction(self) -> str:
        """ "minimize" or "maximize": what makes the primary objective better."""
        return BY_NAME[self.primary_objective].direction

    @property
    def directions(self) -> list[str]:
        """Each objective's direction, as the Optuna study takes them."""
        return [BY_NAME[name].direction for name in self.objectives]

    @property
    def multi_objective(self) -> bool:
        return len(self.objectives) > 1

    @property
    def accuracy_every_eval(self) -> bool:
        """Answers are decoded at every evaluation: asked for, or the primary objective is an
        accuracy (it selects checkpoints and prunes on it)."""
        return self.eval.accuracy and (
            self.eval.every_eval or BY_NAME[self.primary_objective].accuracy
        )

    @property
    def on_policy_possible(self) -> bool:
        """Whether any trial may take on-policy steps (search.lmbda above 0 somewhere)."""
        return may_be_positive(self.search, self.baselines, "lmbda")

    @property
    def cached_top_ks(self) -> list[int]:
        """The top_k values trials may use when they all read the teacher's top-K cache, else []
        (a top_k of 'all', or train.teacher_cache: false: the teacher runs online)."""
        return finite_top_ks(self.search, self.baselines) if self.train.teacher_cache else []

    @property
    def experiment_name(self) -> str:
        return self.tracking.experiment or self.name

    def resolve_path(self, value: str) -> str:
        """A local file or folder (a relative one beside the study file, else from the current
        folder) as an absolute path, which reads the same from anywhere; a hub id as it is."""
        path = Path(value).expanduser()
        for candidate in (Path(self.base_dir) / path, path):
            if candidate.exists():
                return str(candidate.resolve())
        return value

    def rerun_settings(self, number: int, params: dict) -> dict:
        """The settings, by key path, that turn this study into a rerun of its trial ``number``
        alone: its parameters fixed, one trial, no baselines and no seed check."""
        return {
            "name": f"{self.name}-trial{number}",
            "n_trials": 1,
            "baselines": [],
            "seed_check.top": 0,
            **{f"search.{name}": value for name, value in params.items()},
        }

    def to_dict(self) -> dict:
        """The resolved study as plain data, for recording: passwords in URLs are masked."""
        data = redact_tree(_to_plain(self))
        for f in dataclasses.fields(self):
            if f.metadata.get("internal"):
                data.pop(f.name)
        return data

    def fingerprint(self) -> str:
        """Short hash of the resolved study, the same for equal settings (passwords aside)."""
        text = json.dumps(self.to_dict(), sort_keys=True, default=str)
        return hashlib.sha256(text.encode()).hexdigest()[:12]


def read_chat_template(value: str, base_dir: str = ".") -> str:
    """The Jinja text of ``data.chat_template``: given inline (it holds ``{{`` or ``{%``), or the
    file it names (a relative path beside the study file, else from the current folder)."""
    if "{{" in value or "{%" in value:
        return value
    path = Path(value).expanduser()
    beside_study = Path(base_dir) / path
    return (beside_study if not path.is_absolute() and beside_study.exists() else path).read_text()


def _to_plain(obj: Any) -> Any:
    if isinstance(obj, Param):
        if obj.is_fixed:
            return obj.value
        if obj.choices is not None:
            return list(obj.choices)
        plain = {"low": obj.low, "high": obj.high, "log": obj.log}
        return plain | ({"step": obj.step} if obj.step is not None else {})
    if dataclasses.is_dataclass(obj):
        return {f.name: _to_plain(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if isinstance(obj, tuple):
        return [_to_plain(v) for v in obj]
    return obj
