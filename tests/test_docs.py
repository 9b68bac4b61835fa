"""The documentation stays true to the repository: every relative link in README.md and docs/*.md
points at a file that exists, and every `dspark ...` command shown in a fenced shell block parses
with the CLI's own argparse parser (nothing is run; paths in the commands need not exist).

Nothing is skipped silently: a command that cannot be checked (a shell placeholder, a `torchrun`
line without `-m dspark`) is reported as a DocCommandNotChecked warning, and every subcommand the
CLI has must be exercised by at least one checked command in the docs."""

from __future__ import annotations

import contextlib
import io
import re
import shlex
import warnings
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SHELL_LANGS = {"bash", "sh", "shell", "console"}
SHELL_OPERATORS = {"&&", "||", ";", "|", "&", "(", ")"}
REDIRECTS = {">", ">>", "<", "2>", "2>>", "&>"}
FENCE = re.compile(r"^(?P<indent>\s*)(?P<fence>```+|~~~+)\s*(?P<info>[^\s`]*)")
LINK = re.compile(r"!?\[(?:[^\[\]]|\[[^\]]*\])*\]\(\s*<?(?P<target>[^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")
REF_LINK = re.compile(r"^\s{0,3}\[[^\]]+\]:\s*<?(?P<target>\S+?)>?(?:\s+.*)?$")
INLINE_CODE = re.compile(r"`+[^`]*`+")
PLACEHOLDER = re.compile(r"\$|<[A-Za-z_][\w-]*>|^\.\.\.$|\{[A-Z_]+\}")


class DocCommandNotChecked(UserWarning):
    """A `dspark` command in the docs that the parser check could not cover."""


def doc_files() -> list[Path]:
    files = [ROOT / "README.md", *sorted((ROOT / "docs").rglob("*.md"))]
    return [f for f in files if f.is_file()]


def rel(path: Path) -> str:
    return str(path.relative_to(ROOT))


@dataclass
class Block:
    file: Path
    line: int  # 1-based line of the opening fence
    lang: str
    lines: list[str]


def split_markdown(path: Path) -> tuple[list[tuple[int, str]], list[Block]]:
    """(prose lines with their numbers, fenced code blocks)."""
    prose: list[tuple[int, str]] = []
    blocks: list[Block] = []
    current: Block | None = None
    closing = ""
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        match = FENCE.match(line)
        if current is None:
            if match:
                closing = match.group("fence")
                current = Block(path, number, match.group("info").lower(), [])
            else:
                prose.append((number, line))
        elif line.strip().startswith(closing) and not line.strip()[len(closing):].strip():
            blocks.append(current)
            current = None
        else:
            current.lines.append(line)
    assert current is None, f"{rel(path)}:{current.line}: code fence never closed"
    return prose, blocks


# ----------------------------------------------------------------------------- links


def relative_links(path: Path) -> list[tuple[int, str]]:
    prose, _ = split_markdown(path)
    found = []
    for number, line in prose:
        text = INLINE_CODE.sub("", line)
        targets = [m.group("target") for m in LINK.finditer(text)]
        ref = REF_LINK.match(text)
        if ref:
            targets.append(ref.group("target"))
        for target in targets:
            if re.match(r"^[a-zA-Z][a-zA-Z0-9+.-]*:", target) or target.startswith("#"):
                continue  # http(s), mailto, ...: not checked; a pure #anchor: same page
            found.append((number, target))
    return found


def test_doc_files_exist():
    names = [rel(f) for f in doc_files()]
    assert "README.md" in names
    assert any(n.startswith("docs/") for n in names), "no pages under docs/"


@pytest.mark.parametrize("path", doc_files(), ids=rel)
def test_relative_links_resolve(path: Path):
    broken = []
    for number, target in relative_links(path):
        file_part = target.split("#", 1)[0].split("?", 1)[0]
        if not file_part:
            continue
        resolved = (ROOT / file_part.lstrip("/")) if file_part.startswith("/") else (path.parent / file_part)
        if not resolved.exists():
            broken.append(f"{rel(path)}:{number}: {target}")
    assert not broken, "links to missing files:\n" + "\n".join(broken)


def test_every_docs_page_is_linked():
    """A page nobody links to is a page nobody finds."""
    linked = set()
    for path in doc_files():
        for _, target in relative_links(path):
            file_part = target.split("#", 1)[0]
            if file_part:
                linked.add((path.parent / file_part).resolve())
    orphans = [rel(p) for p in doc_files() if p.name != "README.md" and p.resolve() not in linked]
    assert not orphans, f"docs pages linked from nowhere: {orphans}"


# ----------------------------------------------------------------------------- commands


@dataclass
class Command:
    where: str  # file:line
    text: str  # the joined shell line
    argv: list[str] | None  # the dspark arguments, None when not checked
    reason: str = ""  # why not checked


def joined_lines(block: Block) -> list[tuple[int, str]]:
    """The block's logical lines (trailing backslashes joined), with their first line number."""
    out: list[tuple[int, str]] = []
    buffer, start = "", 0
    for offset, raw in enumerate(block.lines, 1):
        line = raw.rstrip()
        if block.lang == "console" and not buffer:
            if not line.lstrip().startswith("$ "):
                continue  # console output, not a command
            line = line.lstrip()[2:]
        if not buffer:
            start = block.line + offset
        if line.endswith("\\"):
            buffer += line[:-1] + " "
            continue
        out.append((start, buffer + line))
        buffer = ""
    if buffer:
        out.append((start, buffer))
    return out


def is_dspark(token: str) -> bool:
    return token == "dspark" or token.endswith("/dspark")


def dspark_argv(segment: list[str]) -> tuple[list[str] | None, str]:
    """The arguments after `dspark` / `python -m dspark` / `torchrun ... -m dspark` in one simple
    command, or (None, reason) when the segment is a dspark command that cannot be checked, or
    (None, "") when it is no dspark command."""
    words = list(segment)
    while words and re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*=\S*", words[0]):
        words.pop(0)  # environment assignments: OMP_NUM_THREADS=1 dspark ...
    if not words:
        return None, ""
    head = words[0]
    if is_dspark(head):
        argv = words[1:]
    elif "-m" in words and words.index("-m") + 1 < len(words) and words[words.index("-m") + 1] == "dspark":
        if not (head.endswith("python") or re.search(r"python3(\.\d+)?$", head) or head.endswith("torchrun")):
            return None, ""
        argv = words[words.index("-m") + 2:]
    elif head.endswith("torchrun"):
        return None, "a torchrun line without `-m dspark`"
    else:
        return None, ""
    cleaned: list[str] = []
    skip_next = False
    for word in argv:
        if skip_next:
            skip_next = False
            continue
        if word in REDIRECTS:
            skip_next = True  # `> file`: the shell's, not dspark's
            continue
        if PLACEHOLDER.search(word):
            return None, f"shell placeholder {word!r}"
        cleaned.append(word)
    return cleaned, ""


def doc_commands() -> list[Command]:
    commands: list[Command] = []
    for path in doc_files():
        _, blocks = split_markdown(path)
        for block in blocks:
            if block.lang not in SHELL_LANGS:
                if block.lang == "" and any(re.match(r"\s*(\S*/)?dspark\s", ln) for ln in block.lines):
                    commands.append(Command(f"{rel(path)}:{block.line}", block.lines[0], None,
                                            "a dspark command in a fence without a language (mark it ```bash)"))
                continue
            for number, line in joined_lines(block):
                where = f"{rel(path)}:{number}"
                lexer = shlex.shlex(line, posix=True, punctuation_chars=True)
                lexer.whitespace_split = True
                lexer.commenters = "#"
                try:
                    tokens = list(lexer)
                except ValueError as err:
                    if "dspark" in line:
                        commands.append(Command(where, line, None, f"shell syntax not parsed ({err})"))
                    continue
                segment: list[str] = []
                for token in [*tokens, ";"]:
                    if token in SHELL_OPERATORS:
                        argv, reason = dspark_argv(segment)
                        if argv is not None or reason:
                            commands.append(Command(where, line.strip(), argv, reason))
                        segment = []
                    else:
                        segment.append(token)
    return commands


COMMANDS = doc_commands()
CHECKED = [c for c in COMMANDS if c.argv is not None]


def parse(argv: list[str]):
    """Parse with the CLI's own parser; returns (namespace or None, exit code, argparse's message)."""
    from dspark.cli import build_parser

    parser = build_parser()
    err, out = io.StringIO(), io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(out):
        try:
            namespace = parser.parse_args(argv)
        except SystemExit as exit_:
            return None, exit_.code, err.getvalue().strip() or out.getvalue().strip()
    return namespace, 0, ""


def test_docs_show_commands():
    assert len(CHECKED) >= 10, f"only {len(CHECKED)} dspark commands found in the docs"


@pytest.mark.parametrize("command", CHECKED, ids=[f"{c.where}" for c in CHECKED])
def test_command_parses(command: Command):
    namespace, code, message = parse(command.argv)
    if namespace is None:
        assert code == 0, f"{command.where}: `{command.text}` does not parse:\n{message}"
        return  # --help
    assert callable(getattr(namespace, "func", None)), f"{command.where}: no subcommand selected"


def test_unchecked_commands_are_reported():
    """Commands the check cannot cover are warned about, never dropped silently; a fence without a
    language hiding dspark commands is an error (mark it ```bash so the commands get checked)."""
    unchecked = [c for c in COMMANDS if c.argv is None]
    for c in unchecked:
        warnings.warn(f"{c.where}: not checked ({c.reason}): {c.text}", DocCommandNotChecked, stacklevel=1)
    untagged = [f"{c.where}: {c.reason}" for c in unchecked if "without a language" in c.reason]
    assert not untagged, "\n".join(untagged)


def subcommands() -> list[tuple[str, ...]]:
    """Every leaf subcommand of the CLI, e.g. ("drafter", "init")."""
    import argparse

    from dspark.cli import build_parser

    def walk(parser: argparse.ArgumentParser, prefix: tuple[str, ...]):
        actions = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
        if not actions:
            yield prefix
            return
        for name, child in actions[0].choices.items():
            yield from walk(child, (*prefix, name))

    return list(walk(build_parser(), ()))


def test_every_subcommand_is_documented():
    shown = {tuple(c.argv[:2]) for c in CHECKED} | {tuple(c.argv[:1]) for c in CHECKED}
    missing = [" ".join(s) for s in subcommands() if s not in shown]
    assert not missing, f"subcommands with no checked example command in the docs: {missing}"


def test_parser_rejects_a_bad_command():
    """The check has teeth: a misspelt option fails it."""
    namespace, code, message = parse(["generate", "--prompt", "x", "--no-such-option"])
    assert namespace is None and code == 2 and "--no-such-option" in message
