"""A generated answer against its reference: the answer taken out of the generation, exact match
and ROUGE-L.

What is compared is the answer a user reads: a generation's text after its think block
(``data.reasoning``'s ``</think>``; one that never closes it has no answer), cut at a guanaco
row's next marker, then, for exact match, what ``eval.answer`` extracts from it and from the
reference alike (GSM8K's ``#### 42``, the last ``\\boxed{42}``, a regular expression). Exact match
compares them with runs of whitespace made one space; ROUGE-L is the F-measure of the longest
common subsequence of their words, as MiniLLM and DistiLLM report it, where a word is a run of
letters and digits of any script, and each Chinese, Japanese or Korean character is a word of its
own (those scripts write no spaces; ``rouge_score``'s default keeps ``[a-z0-9]`` runs only, which
scores identical CJK answers 0).
"""

from __future__ import annotations

import re

from kdsweep.data import answer_after_reasoning, answer_text
from kdsweep.study.config import BOXED_ANSWER, GSM8K_ANSWER, WHOLE_ANSWER

# GSM8K's own extractor (openai/grade-school-math), and the noise lm-evaluation-harness removes
# from both sides before comparing: thousands separators, dollars, a final full stop.
_GSM8K = re.compile(r"#### (\-?[0-9\.\,]+)")
_GSM8K_NOISE = re.compile(r"[,$]|\.$")
_BOXED = "\\boxed{"

# One token per character in the scripts written without spaces (the usual multilingual ROUGE
# convention, as in BERT's and SacreBLEU's Chinese tokenizers): CJK ideographs (with extensions
# and compatibility forms), kana, Hangul.
_CJK = (
    "\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff"
    "\U00020000-\U0002a6df\U0002a700-\U0002ebef\U00030000-\U0003134f\U0002f800-\U0002fa1f"
    "\u3040-\u309f\u30a0-\u30ff\u31f0-\u31ff\uff66-\uff9f"
    "\uac00-\ud7af\u1100-\u11ff\u3130-\u318f"
)
_WORD = re.compile(rf"[{_CJK}]|[^\W_{_CJK}]+")


def generated_answer(text: str) -> str | None:
    """The answer in a generation's decoded text: after its think block, up to a guanaco row's
    next marker; None when the generation opened a think block and never closed it."""
    answer = answer_after_reasoning(text)
    return None if answer is None else answer_text(answer)


def extract(answer: str, pattern: str = WHOLE_ANSWER) -> str | None:
    """What ``eval.answer`` compares in ``answer``: the whole of it, GSM8K's number after
    ``####``, the last ``\\boxed{...}``'s content, or a regular expression's last match (its group,
    else the whole match); None when there is none.

    Example:
        >>> extract("She has 1,600 apples.\\n#### 1,600", "gsm8k")
        '1600'
        >>> extract("so \\\\boxed{\\\\frac{1}{2}}.", "boxed")
        '\\\\frac{1}{2}'
    """
    if pattern == WHOLE_ANSWER:
        return answer
    if pattern == GSM8K_ANSWER:
        found = _GSM8K.findall(answer)
        return _GSM8K_NOISE.sub("", found[-1].strip()) if found else None
    if pattern == BOXED_ANSWER:
        return _last_boxed(answer)
    matches = list(re.finditer(pattern, answer))
    if not matches:
        return None
    last = matches[-1]
    return (last.group(1) if last.re.groups else last.group(0)).strip()


def _last_boxed(text: str) -> str | None:
    """The content of the last ``\\boxed{...}``, nested braces included (None: none, or open)."""
    start = text.rfind(_BOXED)
    if start < 0:
        return None
    depth, begin = 0, start + len(_BOXED)
    for i in range(begin, len(text)):
        depth += {"{": 1, "}": -1}.get(text[i], 0)
        if depth < 0:
            return text[begin:i].strip()
    return None


def matches(prediction: str | None, reference: str, pattern: str = WHOLE_ANSWER) -> bool:
    """Whether a generated answer (None: none) matches the reference, both extracted by
    ``pattern`` (``eval.answer``)."""
    return prediction is not None and exact_match(
        extract(prediction, pattern), extract(reference, pattern)
    )


def exact_match(prediction: str | None, reference: str | None) -> bool:
    """Equal once runs of whitespace are one space and the ends are stripped; no answer (None)
    matches nothing."""
    if prediction is None or reference is None:
        return False
    return " ".join(prediction.split()) == " ".join(reference.split())


def rouge_l(prediction: str, reference: str) -> float:
    """ROUGE-L F-measure: the longest common subsequence of lower-cased words (CJK characters
    one each), over both lengths; 0 when either has none. On ASCII text it equals
    ``rouge_score``'s default (no stemming)."""
    ours, theirs = words(prediction), words(reference)
    common = _lcs(ours, theirs)
    if not common:
        return 0.0
    precision, recall = common / len(ours), common / len(theirs)
    return 2 * precision * recall / (precision + recall)


def words(text: str) -> list[str]:
    """ROUGE's tokens: runs of letters and digits of any script, each CJK character alone.

    Example:
        >>> words("今天天气很好, GPT-4 works!")
        ['今', '天', '天', '气', '很', '好', 'gpt', '4', 'works']
    """
    return _WORD.findall(text.lower())


def _lcs(a: list[str], b: list[str]) -> int:
    """Length of the longest common subsequence, by dynamic programming over one row."""
    row = [0] * (len(b) + 1)
    for x in a:
        diagonal = 0
        for j, y in enumerate(b, start=1):
            diagonal, row[j] = row[j], diagonal + 1 if x == y else max(row[j], row[j - 1])
    return row[-1]
