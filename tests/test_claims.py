"""The docs claim no more than their tests show: every sentence that says two things are equal, exact or at parity
names the test that shows it, and every test the docs name exists.

The words (case-insensitive, whole words), each a claim that two runs, weights, values or codes are the same:
- "bit for bit", "bit-equal", "bit-identical", "bitwise": the strongest claim there is;
- "exact", "exactly": exactness, of a rule, a value or a reproduction;
- "equal", "equals", "equality": equality of runs, weights or values;
- "identical", "identically": the same, in another word;
- "parity": agreement with another codebase (the authors' fork, verl);
- "same weights", "same accuracy": the two equalities of results this project reports, said without "equal".
"Same" alone, "match" and "as" are left out: the docs use them for settings and inputs ("the same seed", "as TRL
does"), which describe a setup, not a result.

A sentence is a table row, a heading, or a sentence of a paragraph or a list item; fenced and indented code blocks
and HTML comments (test_docs.py's markers) are left out. A sentence with one of the words names a test, as a path
(`tests/test_overlap.py`, `test_overlap.py`) or a test function (`test_a_resumed_run_equals_the_straight_run`), or
is one of `ALLOWED`, with its reason; the tolerance is the sentence's to say, where there is one."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TESTS = ROOT / "tests"
# bench/**/runs/ is a benchmark's scratch (ignored by git), written and deleted while one runs.
PAGES = sorted(
    [ROOT / "README.md", ROOT / "CHANGELOG.md", *(ROOT / "docs").glob("*.md")]
    + [page for page in (ROOT / "bench").glob("**/*.md") if "runs" not in page.relative_to(ROOT).parts]
)

CLAIM = re.compile(
    r"\bbit[- ]for[- ]bit\b|\bbit-(?:equal|equality|identical|exact)\b|\bbitwise\b|\bexact(?:ly)?\b"
    r"|\bequal(?:s|ity)?\b|\bidentical(?:ly)?\b|\bparity\b|\bsame (?:weights|accuracy)\b",
    re.IGNORECASE,
)
# A test named: a test file (under tests/ or by its name) or a test function.
TEST_NAMED = re.compile(r"\btests/[\w/]+\.py\b|\btest_\w+")

# Sentences whose word is no claim about a result, each by a fragment of it and why. Kept short: a sentence that
# claims something names its test instead. All three are in docs/config.md, which is written from BAPOConfig's help.
ALLOWED = {
    "Equal ends give a fixed threshold": "a definition: the range [c, c] of eq. 8 is the fixed threshold c",
    "X2 replays exactly the all-wrong prompts": "the paper's definition of mini-test (section 5.2), not a result",
    "when exactly one is among the reward functions": "a condition of the correctness rule: one such reward, not two",
}


def prose(text: str) -> str:
    """The page without its code blocks and HTML comments, which hold commands and test markers, not claims."""
    text = re.sub(r"<!--.*?-->", "", text, flags=re.DOTALL)
    text = re.sub(r"^```.*?^```[^\n]*$", "", text, flags=re.DOTALL | re.MULTILINE)
    # Indented code: lines of 4 or more spaces after a blank line, up to the next blank line.
    return re.sub(r"(?:^|\n)\n((?: {4,}\S[^\n]*\n?)+)", "\n\n", text)


# Ends a sentence: . ! or ? then space and a capital, a backtick, a quote or a bracket (so "eq. 3" and "e.g. the"
# do not end one).
SENTENCE_END = re.compile(r"(?<=[.!?])\s+(?=[A-Z`\"(\[*])")


def sentences(text: str) -> list[str]:
    """Table rows, headings and the sentences of paragraphs and list items, each on one line."""
    found, block = [], []

    def flush():
        if block:
            found.extend(s.strip() for s in SENTENCE_END.split(" ".join(block)) if s.strip())
            block.clear()

    for line in prose(text).splitlines():
        stripped = line.strip()
        if not stripped:
            flush()
        elif stripped.startswith("|"):
            flush()
            if not re.fullmatch(r"[|\-: ]+", stripped):
                found.append(stripped)
        elif stripped.startswith("#"):
            flush()
            found.append(stripped.lstrip("# "))
        elif re.match(r"(?:[-*]|\d+\.) ", stripped):
            flush()
            block.append(re.sub(r"^(?:[-*]|\d+\.) ", "", stripped))
        else:
            block.append(stripped)
    flush()
    return found


# Where a sentence points, not what it says: link targets and file names (`docs/authors-parity.md`).
POINTERS = re.compile(r"\]\([^)]*\)|[\w./-]+\.(?:md|py|json|yaml|png)\b")


def claims(sentence: str) -> bool:
    """Whether a sentence says, in its own words, that two things are equal, exact or at parity."""
    return bool(CLAIM.search(POINTERS.sub(" ", sentence)))


def unsupported(page: Path) -> list[str]:
    """The sentences of a page that claim equality, exactness or parity and name no test."""
    return [
        sentence
        for sentence in sentences(page.read_text())
        if claims(sentence)
        and not TEST_NAMED.search(sentence)
        and not any(fragment in sentence for fragment in ALLOWED)
    ]


def test_every_claim_of_equality_names_its_test():
    found = {str(page.relative_to(ROOT)): unsupported(page) for page in PAGES}
    found = {page: claims for page, claims in found.items() if claims}
    listed = "\n".join(f"{page}: {claim}" for page, claims in found.items() for claim in claims)
    assert not found, f"claims of equality, exactness or parity that name no test:\n{listed}"


def test_every_allowed_sentence_is_still_in_the_docs():
    text = " ".join(sentence for page in PAGES for sentence in sentences(page.read_text()))
    gone = [fragment for fragment in ALLOWED if fragment not in text]
    assert not gone, f"ALLOWED names sentences the docs no longer have: {gone}"


def test_the_sentence_splitter_reads_tables_lists_and_code_as_claimed():
    page = (
        "A claim, equal (tests/test_a.py). Another, e.g. eq. 3 equal.\n\n| a | equal |\n|---|---|\n\n"
        "- an item\n  continued.\n\n```bash\nequal\n```\n<!-- equal -->\n\n    indented equal\n\n# Heading\n"
    )
    assert sentences(page) == [
        "A claim, equal (tests/test_a.py).",
        "Another, e.g. eq. 3 equal.",
        "| a | equal |",
        "an item continued.",
        "Heading",
    ]


def defined_tests() -> tuple[set[str], set[str]]:
    """The test files under tests/ (by path from the root, and by name) and the test functions they define."""
    files = sorted(TESTS.glob("**/test_*.py"))
    paths = {str(path.relative_to(ROOT)) for path in files} | {path.name for path in files}
    paths |= {str(path.relative_to(TESTS)) for path in files}
    functions = {
        name for path in files for name in re.findall(r"^\s*(?:async )?def (test_\w+)", path.read_text(), re.M)
    }
    return paths, functions


def test_every_test_the_docs_name_exists():
    paths, functions = defined_tests()
    missing = []
    for page in PAGES:
        text = page.read_text()
        for name in re.findall(r"(?<![\w/])((?:tests/)?(?:[\w]+/)*test_\w+\.py)\b", text):
            if name not in paths:
                missing.append(f"{page.relative_to(ROOT)}: {name}")
        for name in re.findall(r"\b(test_\w+)\b(?!\.py)", text):
            if name not in functions:
                missing.append(f"{page.relative_to(ROOT)}: {name}")
    assert not missing, f"tests the docs name that do not exist: {missing}"
