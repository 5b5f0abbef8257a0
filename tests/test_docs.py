"""The documentation runs as written: every ```python block of README.md and docs/*.md executes,
as a user would paste it, in a fresh namespace and an empty temporary working directory; a block
that raises fails its test. Under the suite's default (tests/conftest.py: TRITON_INTERPRET=1) the
blocks' CPU tensors go through the Triton kernels in the interpreter, hence their small shapes.

A block that cannot run here (one needing a GPU, or a download) is marked in the markdown by the
line just before its fence, with the reason:

    <!-- docs test: skip, REASON -->

It is still compiled (a syntax error fails). Also checked: table rows quoted from a committed
results file (after a `<!-- rows from PATH -->` line) appear verbatim in that file, relative links
and their anchors resolve, the README's install pins are the CI's (.ci/run), and the documented
commands leave the checkout clean.
"""

import re
import shutil
import subprocess
import tempfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
DOCS = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]
SKIP = re.compile(r"<!-- docs test: skip, (.+) -->")
ROWS_FROM = re.compile(r"<!-- rows from (\S+) -->")
LINK = re.compile(r"\]\(([^)\s]+)\)")


def _blocks():
    """(doc, first line number, code, skip reason or None) for every ```python block."""
    blocks = []
    for doc in DOCS:
        lines = doc.read_text().split("\n")
        i = 0
        while i < len(lines):
            if lines[i].strip() == "```python":
                end = next(j for j in range(i + 1, len(lines)) if lines[j].strip() == "```")
                marker = SKIP.fullmatch(lines[i - 1].strip()) if i else None
                blocks.append((doc, i + 2, "\n".join(lines[i + 1:end]) + "\n", marker and marker.group(1)))
                i = end
            i += 1
    return blocks


BLOCKS = _blocks()


def test_the_docs_have_python_blocks():
    """Catches a change of fence syntax that would leave the block test below nothing to run."""
    assert len(BLOCKS) >= 8 and {doc.name for doc, *_ in BLOCKS} >= {"README.md", "peft.md", "qlora.md"}


@pytest.mark.parametrize("doc, line, code, skip", BLOCKS,
                         ids=[f"{doc.relative_to(REPO)}:{line}" for doc, line, _, _ in BLOCKS])
def test_python_block_runs_as_written(doc, line, code, skip, tmp_path, monkeypatch):
    """Catches a snippet that no longer runs: a missing import, a renamed argument, a device it
    assumes, a name it never defines."""
    compiled = compile(code, f"{doc.relative_to(REPO)}:{line}", "exec")
    if skip:
        pytest.skip(skip)
    monkeypatch.chdir(tmp_path)
    exec(compiled, {"__name__": "__main__"})


def test_quoted_result_rows_are_in_their_files():
    """Catches a number in the docs that the committed results no longer hold (results regenerated,
    the docs not): every table line after a `<!-- rows from PATH -->` line is a line of PATH."""
    quoted = 0
    for doc in DOCS:
        lines = doc.read_text().split("\n")
        for i, text in enumerate(lines):
            match = ROWS_FROM.fullmatch(text.strip())
            if not match:
                continue
            source = set((REPO / match.group(1)).read_text().split("\n"))
            table = list(_table_after(lines, i + 1))
            assert len(table) >= 3, f"{doc.name}:{i + 1}: no table after the marker"
            missing = [row for row in table if row not in source]
            assert not missing, f"{doc.name}:{i + 1}: not in {match.group(1)}:\n" + "\n".join(missing)
            quoted += 1
    assert quoted >= 2


def _table_after(lines, start):
    """The table's lines from `start` on (indented under a list item or not)."""
    for text in lines[start:]:
        if not text.strip().startswith("|"):
            return
        yield text.strip()


def _anchors(path):
    """GitHub's heading anchors of a markdown file (headings outside code blocks)."""
    anchors, fenced = set(), False
    for line in path.read_text().split("\n"):
        fenced ^= line.startswith("```")
        if not fenced and re.match(r"#{1,6} ", line):
            anchors.add(re.sub(r"[^\w\- ]", "", line.lstrip("#").strip().lower()).replace(" ", "-"))
    return anchors


def test_relative_links_resolve():
    """Catches a link left pointing at a moved section or file."""
    checked = 0
    for doc in DOCS:
        for target in LINK.findall(doc.read_text()):
            if re.match(r"[a-z]+://", target):
                continue
            path, _, anchor = target.partition("#")
            resolved = (doc.parent / path).resolve() if path else doc
            assert resolved.exists(), f"{doc.name}: link to {target}"
            if anchor:
                assert anchor in _anchors(resolved), f"{doc.name}: link to {target}: no such heading"
            checked += 1
    assert checked >= 10


def test_readme_install_pins_are_the_ci_pins():
    """Catches the README's CPU install step drifting from what CI installs and tests (.ci/run)."""
    ci = (REPO / ".ci" / "run").read_text()
    readme = (REPO / "README.md").read_text()
    pins = {name: re.search(rf'"{name}==([\w.]+)"', ci).group(1) for name in ("torch", "triton")}
    assert f"pip install torch=={pins['torch']} triton=={pins['triton']} " in readme, pins
    assert "python -m pytest -q" in ci and 'pip install -e ".[dev]" && python -m pytest -q' in readme


def _git_ignored(path):
    return subprocess.run(["git", "-C", REPO, "check-ignore", "-q", path]).returncode == 0


def test_verify_numerics_default_output_is_ignored_by_git():
    """Catches `python -m benchmarks.verify_numerics` rewriting the committed numerics tables (and
    dirtying the checkout) when run without --output-dir."""
    from benchmarks.verify_numerics import _parse, default_output_dir

    if shutil.which("git") is None or subprocess.run(["git", "-C", REPO, "rev-parse"], capture_output=True).returncode:
        pytest.skip("not a git checkout")
    assert _parse([]).output_dir is None
    for device in ("cpu", "cuda"):
        target = default_output_dir(device) / "numerics.json"
        assert target.parent != REPO / "benchmarks" / "results"
        assert _git_ignored(target), target


@pytest.mark.parametrize("example", ["finetune", "qlora"])
def test_examples_write_outside_the_working_directory(example, tmp_path, monkeypatch):
    """Catches an example that leaves its adapter directory in the directory it is run from (the
    checkout, for `python -m lorakernels.examples...`): by default it goes to a new temporary one."""
    pytest.importorskip("transformers")
    if example == "qlora":
        pytest.importorskip("bitsandbytes")
    import importlib

    main = importlib.import_module(f"lorakernels.examples.{example}").main
    monkeypatch.setenv("LORAKERNELS_BACKEND", "torch")  # the kernels have their own tests
    (tmp_path / "cwd").mkdir()
    (tmp_path / "tmp").mkdir()
    monkeypatch.chdir(tmp_path / "cwd")
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path / "tmp"))
    main(["--steps", "1"])
    assert list((tmp_path / "cwd").iterdir()) == []
    written = [p for p in (tmp_path / "tmp").rglob("adapter_model.safetensors")]
    assert len(written) == 1 and written[0].parent.name.startswith(f"{'q' if example == 'qlora' else ''}lora-adapter-")
