"""The documentation against the code: the generated command reference is current, every
command, option and backend option is documented, the README keeps its size and its first
two commands, and every relative link and #anchor in README.md and docs/*.md resolves."""
from __future__ import annotations

import importlib.util
import re
from pathlib import Path

import click
import pytest

from snapshotter.backend import BUILTIN_BACKENDS, load_backend
from snapshotter.cli import cli as root
from snapshotter.config import REPOSITORY_KEYS

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"
README = ROOT / "README.md"
PAGES = [README, *sorted(DOCS.glob("*.md"))]
README_LIMIT = 12_000


def generator():
    spec = importlib.util.spec_from_file_location("gen_cli_docs", ROOT / "scripts" / "gen_cli_docs.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


GEN = generator()


def without_code(text: str) -> str:
    """Markdown text without fenced code blocks (their lines blanked, so line numbers stay)."""
    out, fenced = [], False
    for line in text.splitlines():
        if line.lstrip().startswith("```"):
            fenced = not fenced
            out.append("")
        else:
            out.append("" if fenced else line)
    return "\n".join(out)


def handwritten() -> str:
    """README.md and docs/*.md as people wrote them: the generated reference left out."""
    parts = []
    for page in PAGES:
        text = page.read_text()
        if page == GEN.DOC:
            text = text.replace(GEN.current(text), "")
        parts.append(text)
    return "\n".join(parts)


def commands(group=root, path=()):
    ctx = click.Context(group)
    for name in group.list_commands(ctx):
        cmd = group.get_command(ctx, name)
        yield (*path, name), cmd
        if isinstance(cmd, click.Group):
            yield from commands(cmd, (*path, name))


def options(cmd):
    """Each option of a command as the tuple of its flags (help left out)."""
    for param in cmd.params:
        if isinstance(param, click.Option) and "--help" not in param.opts:
            yield tuple(param.opts + param.secondary_opts)


# -- (a) the generated reference is current ----------------------------------------------

def test_the_generated_command_reference_is_current():
    text = GEN.DOC.read_text()
    assert GEN.current(text) == GEN.render(), (
        f"docs/commands.md is out of date with the CLI: run `{GEN.COMMAND}` and commit the result")


# -- (b) every command, subcommand and option is documented -----------------------------------

def test_every_command_and_option_is_documented():
    generated = GEN.current(GEN.DOC.read_text())
    prose = handwritten()
    missing = []
    for flags in options(root):
        if not any(re.search(rf"(?<![\w-]){re.escape(f)}(?![\w-])", prose) for f in flags):
            missing.append(f"global option {'/'.join(flags)}")
    for path, cmd in commands():
        name = " ".join(path)
        if f"### `snapshotter {name}`" not in generated:
            missing.append(f"`{name}` in the generated reference")
        if not re.search(rf"`(snapshotter )?{re.escape(name)}[ `\\]", prose):
            missing.append(f"command `{name}` in the prose of README.md or docs/")
        for flags in options(cmd):
            if not any(re.search(rf"(?<![\w-]){re.escape(f)}(?![\w-])", prose) for f in flags):
                missing.append(f"{name} {'/'.join(flags)} in the prose of README.md or docs/")
            if not any(re.search(rf"(?<![\w-]){re.escape(f)}(?![\w-])", generated) for f in flags):
                missing.append(f"{name} {'/'.join(flags)} in the generated reference")
    assert not missing, "not documented:\n  " + "\n  ".join(missing)


# -- (c) backend options and [repository] keys in docs/configuration.md -----------------------

def documented_keys(heading: str) -> list[str]:
    """The names in the first column of the first table under ``## heading`` of
    docs/configuration.md (a cell may name several: `collections`, `exclude`)."""
    text = without_code((DOCS / "configuration.md").read_text())
    match = re.search(rf"^## {re.escape(heading)}\n(.*?)(?=^## |\Z)", text, re.M | re.S)
    assert match, f"docs/configuration.md has no section '## {heading}'"
    names, in_table = [], False
    for line in match.group(1).splitlines():
        if line.startswith("|"):
            cells = [c.strip() for c in line.strip("|").split("|")]
            if in_table and not set(cells[0]) <= set("-: "):
                names += re.findall(r"`([^`]+)`", cells[0])
            in_table = True
        elif in_table:
            break
    return names


@pytest.mark.parametrize("backend", sorted(BUILTIN_BACKENDS))
def test_every_backend_option_is_documented_and_every_documented_option_exists(backend):
    declared = {o.name for o in load_backend(backend).options}
    documented = documented_keys(f"`{backend}` backend options")
    assert len(documented) == len(set(documented)), f"{backend}: an option is documented twice: {documented}"
    assert not declared - set(documented), (
        f"docs/configuration.md, `{backend}` backend options: missing {sorted(declared - set(documented))}")
    assert not set(documented) - declared, (
        f"docs/configuration.md, `{backend}` backend options: {sorted(set(documented) - declared)} "
        f"is not an option of the {backend} backend")


def test_every_repository_key_is_documented_and_every_documented_key_exists():
    documented = set(documented_keys("`[repository]`"))
    assert documented == REPOSITORY_KEYS, (
        f"docs/configuration.md, [repository]: missing {sorted(REPOSITORY_KEYS - documented)}, "
        f"unknown {sorted(documented - REPOSITORY_KEYS)}")


# -- (d) the README: short, and the two first commands first ---------------------------------

def ci_test_command() -> str:
    lines = [line.strip() for line in (ROOT / ".ci" / "run").read_text().splitlines()
             if "pytest" in line and not line.lstrip().startswith("#")]
    assert len(lines) == 1, f".ci/run: expected one line that runs pytest, found {lines}"
    return lines[0]


def test_readme_is_short_and_starts_with_the_two_commands():
    text = README.read_text()
    assert len(text) <= README_LIMIT, f"README.md has {len(text):,} characters; at most {README_LIMIT:,}"
    first_section = text.find("\n## ")
    blocks = [(m.start(), m.group(1).strip())
              for m in re.finditer(r"^```sh\n(.*?)^```", text, re.M | re.S)]
    assert len(blocks) >= 2 and blocks[1][0] < first_section, (
        "README.md must open with the two commands, before its first section")
    (_, install_and_demo), (_, install_and_test) = blocks[:2]
    assert re.fullmatch(r"python3 -m pip install -e \. && snapshotter demo( .*)?", install_and_demo), (
        f"the README's first command installs and runs the demo; it is {install_and_demo!r}")
    assert install_and_test == ci_test_command(), (
        f"the README's test command {install_and_test!r} differs from the one .ci/run runs, "
        f"{ci_test_command()!r}: keep them identical")


# -- (e) relative links and anchors resolve -------------------------------------------------

def slug(heading: str) -> str:
    """A heading's anchor as GitHub makes it."""
    text = heading.strip().lower().replace("`", "")
    text = re.sub(r"[^\w\- ]", "", text)
    return text.replace(" ", "-")


def anchors(page: Path) -> set[str]:
    seen: dict[str, int] = {}
    out = set()
    for m in re.finditer(r"^#{1,6} +(.+?) *#*$", without_code(page.read_text()), re.M):
        base = slug(m.group(1))
        n = seen.get(base, 0)
        seen[base] = n + 1
        out.add(base if n == 0 else f"{base}-{n}")
    return out


def links(page: Path) -> list[str]:
    text = without_code(page.read_text())
    text = re.sub(r"`[^`\n]*`", "", text)  # inline code is not a link
    return re.findall(r"\[[^\]]*\]\(([^)\s]+)\)", text)


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(ROOT)))
def test_relative_links_and_anchors_resolve(page):
    broken = []
    for target in links(page):
        if re.match(r"[a-z][a-z0-9+.-]*:", target):  # https:, mailto:
            continue
        path, _, anchor = target.partition("#")
        dest = (page.parent / path).resolve() if path else page
        if not dest.exists():
            broken.append(f"{target}: no such file")
        elif anchor and dest.suffix == ".md" and anchor not in anchors(dest):
            broken.append(f"{target}: no heading #{anchor} in {dest.relative_to(ROOT)}")
    assert not broken, f"{page.relative_to(ROOT)}: broken links:\n  " + "\n  ".join(broken)


def test_the_readme_links_to_every_docs_page():
    linked = {(README.parent / t.partition("#")[0]).resolve() for t in links(README)}
    unlinked = [p.name for p in DOCS.glob("*.md") if p.resolve() not in linked]
    assert not unlinked, f"README.md does not link to docs/{', docs/'.join(unlinked)}"
