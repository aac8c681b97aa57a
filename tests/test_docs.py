"""The README and docs/ stay true to the code: every study key documented, and only real ones; the
README short, its links live, its install lines those CI runs. Offline, no torch, well under a
second."""

from __future__ import annotations

import dataclasses
import re
import typing
from pathlib import Path

from kdsweep.study.config import StudyConfig
from kdsweep.study.space import SEARCH_SPACE, Param

from conftest import ROOT

README = ROOT / "README.md"
DOCS = ROOT / "docs"
STUDY_FILE_DOC = DOCS / "study-file.md"
CI = ROOT / ".ci" / "run"
MAX_README_LINES = 150

_FENCE = re.compile(r"^```.*?^```", re.S | re.M)
_CODE_SPAN = re.compile(r"`[^`\n]*`")
_LINK = re.compile(r"\[[^\]]*\]\(([^)\s]+)(?:\s+\"[^\"]*\")?\)")


def config_keys(cls: type = StudyConfig, prefix: str = "") -> set[str]:
    """Every key a study file may hold, as a dotted path: the dataclass fields of
    kdsweep.study.config, nested configs walked recursively; a search parameter (a Param) is one
    key, ``search.<name>``, whose forms (range, choices, value) docs/study-file.md describes in
    prose."""
    keys = set()
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        if f.metadata.get("internal"):  # base_dir: the study file's folder, set by the loader
            continue
        key = f"{prefix}{f.name}"
        hint = hints[f.name]
        if dataclasses.is_dataclass(hint) and hint is not Param:
            keys |= config_keys(hint, f"{key}.")
        else:
            keys.add(key)
    return keys


def documented_keys() -> list[str]:
    """The first column of every table in docs/study-file.md whose header starts with ``key``."""
    keys, in_key_table = [], False
    for line in STUDY_FILE_DOC.read_text().splitlines():
        if not line.startswith("|"):
            in_key_table = False
            continue
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if cells[0] == "key":
            in_key_table = True
        elif in_key_table and not set(cells[0]) <= set("-: "):
            match = re.fullmatch(r"`([^`]+)`", cells[0])
            assert match, (
                "docs/study-file.md: a key table's first column must be one `key.path`, got "
                f"{cells[0]!r}"
            )
            keys.append(match.group(1))
    return keys


def test_config_keys_cover_the_search_space():
    """The walk above sees the search section as SEARCH_SPACE declares it, one key per
    parameter."""
    assert {k for k in config_keys() if k.startswith("search.")} == {
        f"search.{p.name}" for p in SEARCH_SPACE
    }


def test_study_file_doc_lists_every_key_and_only_real_ones():
    documented = documented_keys()
    real = config_keys()
    problems = []
    if missing := sorted(real - set(documented)):
        problems.append(f"lacks a table row for these study keys: {', '.join(missing)}")
    if unknown := sorted(set(documented) - real):
        problems.append(
            f"documents keys that kdsweep.study.config does not have: {', '.join(unknown)}"
        )
    if duplicated := sorted({k for k in documented if documented.count(k) > 1}):
        problems.append(f"documents these keys more than once: {', '.join(duplicated)}")
    assert not problems, "docs/study-file.md " + "; and ".join(problems)


def test_readme_is_short():
    lines = len(README.read_text().splitlines())
    assert lines <= MAX_README_LINES, (
        f"README.md has {lines} lines; keep it to {MAX_README_LINES} and move the rest to docs/"
    )


def test_relative_links_point_at_files():
    pages = [README, *sorted(DOCS.glob("*.md"))]
    assert len(pages) > 1, "docs/ holds no pages"
    broken = []
    for page in pages:
        text = _CODE_SPAN.sub("", _FENCE.sub("", page.read_text()))
        for target in _LINK.findall(text):
            if re.match(r"[a-z][a-z0-9+.-]*:", target) or target.startswith("#"):
                continue  # a URL (https:, mailto:) or an anchor in the same page
            path, _, anchor = target.partition("#")
            file = page.parent / path
            if not file.exists():
                broken.append(f"{page.relative_to(ROOT)}: {target} (no such file)")
            elif anchor and file.suffix == ".md" and anchor not in _anchors(file):
                broken.append(f"{page.relative_to(ROOT)}: {target} (no such heading)")
    assert not broken, "broken links:\n" + "\n".join(broken)


def _anchors(page: Path) -> set[str]:
    """The anchors GitHub gives a page's headings: lower case, punctuation dropped, spaces as -."""
    headings = re.findall(r"^#+\s+(.+?)\s*$", _FENCE.sub("", page.read_text()), re.M)
    return {re.sub(r"[^\w\- ]", "", h.lower()).replace(" ", "-") for h in headings}


def _commands(block: str) -> list[str]:
    """The commands of a shell block: comments dropped, ``a && b`` split into a and b."""
    commands = []
    for line in block.splitlines():
        line = line.split(" #", 1)[0].strip()
        if line and not line.startswith("#"):
            commands += [part.strip() for part in line.split("&&")]
    return commands


def _readme_blocks() -> list[str]:
    return re.findall(r"^```(?:bash|sh|shell)\n(.*?)^```", README.read_text(), re.S | re.M)


def _ci_commands(prefix: str) -> list[str]:
    return [
        line.strip() for line in CI.read_text().splitlines() if line.strip().startswith(prefix)
    ]


def test_readme_installs_as_ci_does():
    """.ci/run installs and tests exactly as the quick start tells a new user."""
    blocks = _readme_blocks()
    assert len(blocks) >= 2, "README.md: the quick start needs an install block and a test block"
    install, test = _commands(blocks[0]), _commands(blocks[1])
    ci_install = _ci_commands("pip install")
    assert {"pip install torch==2.13.0", 'pip install -e ".[test]"'} <= set(ci_install), ci_install
    missing = [line for line in ci_install if line not in install]
    assert not missing, f"README.md's first command block lacks .ci/run's install lines: {missing}"
    ci_test = _ci_commands("python -m pytest")
    assert ci_test and all(line in test for line in ci_test), (
        f"README.md's second command block must run {ci_test}"
    )


def mapped_modules() -> set[str]:
    """The modules docs/module-map.md's tree of modules lists, as paths under kdsweep/: each
    line names a file or a folder, its indentation (two spaces a level) where it sits."""
    text = (DOCS / "module-map.md").read_text()
    tree = _FENCE.findall(text.split("## The modules", 1)[1])[0].splitlines()
    folders, found = [], set()
    for line in tree:
        name = line.strip().split(" ", 1)[0]
        depth = (len(line) - len(line.lstrip())) // 2
        if depth == 0 or not name.endswith(("/", ".py")):
            folders = [name] if depth == 0 else folders
            continue
        folders = folders[:depth]
        if name.endswith("/"):
            folders.append(name)
        else:
            found.add("".join(folders[1:]) + name)
    return found


def test_the_module_map_lists_every_module_and_only_real_ones():
    package = ROOT / "kdsweep"
    real = {
        str(p.relative_to(package))
        for p in package.rglob("*.py")
        if p.name not in ("__init__.py", "__main__.py")
    }
    mapped = mapped_modules()
    assert real - mapped == set(), "docs/module-map.md: add these modules"
    assert mapped - real == set(), "docs/module-map.md: these modules are gone"
