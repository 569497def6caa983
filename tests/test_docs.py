"""Docs that cannot drift (issue 29): README.md and docs/*.md (not ARCHITECTURE.md) against the code.

- docs/cli.md lists every option of every ``padim`` command, and every option it names exists: read
  from the argparse parser itself, and the checker is shown to catch a removed and an invented option;
- every ``padim CMD --option`` written anywhere in the docs is an option of CMD;
- every Python block runs, in order per page, in a folder holding a tiny synthetic ``data/mvtec_ad/bottle``
  and a model fitted on it (``bottle.safetensors``); only the backbone is made offline and small
  (random weights, 64 px); a block marked ``<!-- needs: MODULE -->`` skips when that extra is missing;
- every bash block either runs (its ``padim`` commands, in one subprocess, on the same synthetic data)
  or is marked ``<!-- illustration -->``;
- the public API (``padim.__all__``, ``padim.runtime.__all__``) is documented name by name in
  docs/python-api.md, and no page points users at a deep module path (``padim.core...``);
- relative links and their anchors resolve, and the README stays short and keeps its two commands.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Set

import pytest

ROOT = Path(__file__).resolve().parent.parent
README = ROOT / "README.md"
PAGES = [README] + sorted(p for p in (ROOT / "docs").glob("*.md") if p.name != "ARCHITECTURE.md")
CLI_PAGE, API_PAGE = ROOT / "docs" / "cli.md", ROOT / "docs" / "python-api.md"
# the README's first block, word for word: .ci/run runs it in a new virtualenv
CONTRACT = ('pip install -e ".[test]" && padim demo     # install, then fit and test on a generated category (offline)\n'
            'python -m pytest -q                         # run the tests\n')
LANGUAGES = {"python", "bash", "text", "json"}
OPTION = re.compile(r"(?<![\w-])--[a-z][a-z0-9-]*")
ENTRY = re.compile(r"^- `(--[a-z][a-z0-9-]*)", re.M)
MENTION = re.compile(r"`(padim [a-z][a-z-]*[^`]*)`")  # an inline `padim CMD ...`


@dataclass
class Block:
    page: Path
    line: int
    language: str
    code: str
    marker: str  # "", "illustration" or "needs: a, b" (the HTML comment on the line before the fence)

    @property
    def name(self) -> str:
        return f"{self.page.relative_to(ROOT)}:{self.line}"

    @property
    def needs(self) -> List[str]:
        return [m.strip() for m in self.marker[len("needs:"):].split(",")] if self.marker.startswith("needs:") else []


def blocks(page: Path) -> List[Block]:
    lines, found, i = page.read_text().splitlines(keepends=True), [], 0
    while i < len(lines):
        fence = re.match(r"```(\S*)\s*$", lines[i])
        if not fence:
            i += 1
            continue
        end = next(j for j in range(i + 1, len(lines)) if lines[j].startswith("```"))
        before = next((lines[k].strip() for k in range(i - 1, -1, -1) if lines[k].strip()), "")
        comment = re.fullmatch(r"<!--\s*(.*?)\s*-->", before)
        marker = comment.group(1).split(":")[0] if comment and comment.group(1).startswith("illustration") else \
            (comment.group(1) if comment and comment.group(1).startswith("needs:") else "")
        found.append(Block(page, i + 1, fence.group(1), "".join(lines[i + 1:end]), marker))
        i = end + 1
    return found


ALL_BLOCKS = [block for page in PAGES for block in blocks(page)]


def commands(code: str) -> List[List[str]]:
    """A shell block's commands as argv lists (continuations joined, comments dropped)."""
    return [argv for line in code.replace("\\\n", " ").splitlines() if (argv := shlex.split(line, comments=True))]


def command_options(parser: argparse.ArgumentParser) -> Dict[str, Set[str]]:
    """{"padim": the top level's long options, "fit": fit's, ...}; --help only at the top (every command has it)."""
    def longs(p):
        return {flag for action in p._actions for flag in action.option_strings if flag.startswith("--")}
    found = {"padim": longs(parser)}
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            found.update({name: longs(sub) - {"--help"} for name, sub in action.choices.items()})
    return found


@pytest.fixture(scope="module")
def options() -> Dict[str, Set[str]]:
    from padim.cli.parser import build_parser

    return command_options(build_parser())


def mentions(page: Path) -> List[str]:
    """The page's `padim CMD ...` inline code and the padim command lines of its bash and text blocks."""
    found = [m.group(1) for m in MENTION.finditer(page.read_text())]
    return found + [" ".join(argv) for block in blocks(page) if block.language == "bash"
                    for argv in commands(block.code) if argv[0] == "padim"]


def mention_problems(found: List[str], options: Dict[str, Set[str]]) -> List[str]:
    """Each `padim CMD --opt ...`: CMD a command, every --opt one of its options."""
    problems = []
    for mention in found:
        command = mention.split()[1]
        if command not in options:
            problems.append(f"{mention!r}: padim has no command {command!r}")
        else:
            problems += [f"{mention!r}: padim {command} has no {flag}" for flag in OPTION.findall(mention)
                         if flag not in options[command] | {"--help"}]
    return problems


def cli_reference_problems(text: str, options: Dict[str, Set[str]]) -> List[str]:
    """Each command's section ('## padim CMD') has a '- `--opt ...`' entry for each of its options, and
    every --option written in a section (outside `padim OTHER ...` mentions) is one of that command's
    (outside the command sections: one of any command's)."""
    problems, documented = [], {}
    every = set().union(*options.values())
    for section in re.split(r"^(?=## )", text, flags=re.M):
        heading = re.match(r"## padim(?: ([a-z-]+))?\s*$", section.splitlines()[0]) if section.startswith("## ") else None
        command = (heading.group(1) or "padim") if heading else None
        prose = MENTION.sub("", "\n".join(line for line in section.splitlines() if not line.startswith("padim ")))
        allowed = options.get(command, set()) if command else every
        problems += [f"{'padim ' + command if command else 'the page'}: {flag} is not one of its options"
                     for flag in sorted(set(OPTION.findall(prose)) - allowed)]
        if command:
            documented[command] = set(ENTRY.findall(section))
    for command, flags in options.items():
        if command not in documented:
            problems.append(f"no section '## padim{'' if command == 'padim' else ' ' + command}'")
        problems += [f"padim {command}: {flag} is not documented" for flag in sorted(flags - documented.get(command, flags))]
    return problems


# ------------------------------------------------------------------------------------ the reference


def test_the_cli_reference_lists_every_option_of_every_command(options):
    assert cli_reference_problems(CLI_PAGE.read_text(), options) == []
    assert {"fit", "test", "predict", "update", "export", "benchmark", "serve", "download", "demo"} <= set(options)


def test_the_option_check_finds_a_removed_and_an_invented_option(options):
    text = CLI_PAGE.read_text()
    entry = re.search(r"^- `--quantization-images.*\n(  .*\n)*", text, re.M).group(0)
    assert cli_reference_problems(text.replace(entry, ""), options) == ["padim export: --quantization-images is not documented"]
    invented = text.replace("## padim demo\n", "## padim demo\n\n- `--colour`: not an option.\n")
    assert cli_reference_problems(invented, options) == ["padim demo: --colour is not one of its options"]
    assert mention_problems(["padim fit --tiles 4", "padim tset --model m"], options) == [
        "'padim fit --tiles 4': padim fit has no --tiles", "'padim tset --model m': padim has no command 'tset'"]


def test_every_padim_command_in_the_docs_uses_real_options(options):
    problems = [f"{page.name}: {p}" for page in PAGES for p in mention_problems(mentions(page), options)]
    assert problems == []


# ------------------------------------------------------------------------------------ the pages


def test_the_readme_is_short_and_keeps_its_two_commands():
    assert len(README.read_text().splitlines()) <= 200
    assert blocks(README)[0].code == CONTRACT


def test_every_block_has_a_language_and_a_marker_that_fits_it():
    wrong = [b.name for b in ALL_BLOCKS if b.language not in LANGUAGES
             or (b.marker == "illustration" and b.language != "bash") or (b.needs and b.language != "python")]
    assert wrong == [], "a fence needs a language (python, bash, text, json); only bash may be an illustration"


def test_the_public_api_is_documented_name_by_name():
    import padim
    import padim.runtime

    headings = {name for line in API_PAGE.read_text().splitlines() if line.startswith("#")
                for name in re.findall(r"`([\w.]+)`", line)}
    public = list(padim.__all__) + list(padim.runtime.__all__)
    assert [name for name in public if name not in headings] == []
    assert all(getattr(padim, name) is not None for name in padim.__all__)


def test_no_page_points_users_at_a_deep_module_path():
    inside = sorted(p.stem for p in (ROOT / "padim").iterdir()
                    if p.stem not in ("runtime", "__init__", "__main__", "__pycache__") and (p.is_dir() or p.suffix == ".py"))
    deep = re.compile(r"\bpadim\.(" + "|".join(inside) + r")\b")
    assert [f"{page.name}: {m.group(0)}" for page in PAGES for m in deep.finditer(page.read_text())] == []
    assert deep.search("from padim.files.memory import x") and not deep.search("padim.json, padim.runtime")


def slug(heading: str) -> str:
    """GitHub's anchor for a heading."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def test_relative_links_and_their_anchors_resolve():
    broken = []
    for page in PAGES:
        for target in re.findall(r"\]\(([^)\s]+)\)", page.read_text()):
            if re.match(r"[a-z]+:", target):
                continue
            path, _, anchor = target.partition("#")
            file = (page.parent / path).resolve() if path else page
            anchors = {slug(h) for h in re.findall(r"^#+ (.*)$", file.read_text(), re.M)} if file.suffix == ".md" \
                and file.is_file() else set()
            if not file.exists() or (anchor and anchor not in anchors):
                broken.append(f"{page.name}: {target}")
    assert broken == []


# ------------------------------------------------------------------------------------ running the blocks

# what makes a block offline and fast, and nothing else: the backbone's weights, the image size, Ray's shards
PYTHON_FAST = [(r"\bimage_size=256\b", "image_size=64"), (r'\bbackbone="(\w+)"', r'backbone="\1", weights="random"'),
               (r"\bshards=8\b", "shards=2")]
SHELL_FAST = {"--weights": "random", "--image-size": "64"}
# what the pages' own comments promise, checked after the page ran
PROMISES = {"README.md": lambda scope: scope["result"].index.tolist() == [0, 1]
            and scope["result"].errors[0][:2] == (2, "missing.png"),
            "model-files.md": lambda scope: "checksum does not match" in scope["message"],
            "thresholds.md": lambda scope: scope["strict"].threshold_source == "manual"
            and scope["model"].threshold_source_.startswith("calibration: target FPR 10%")}


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    """A folder as the pages assume one: data/mvtec_ad/bottle (44 good training images, 64 px, so that
    the default calibration holds 20 out), bottle.safetensors and its statistics, a few new images."""
    from padim import PaDiM, find_category, make_synthetic_category

    base = tmp_path_factory.mktemp("docs")
    make_synthetic_category(base / "data" / "mvtec_ad", name="bottle", n_train=44, n_test_good=2, n_test_per_defect=1,
                            size=64)
    bottle = find_category(base / "data" / "mvtec_ad", "bottle", need_test=True)
    model = PaDiM(backbone="resnet18", weights="random", image_size=64, device="cpu").fit(bottle.train,
                                                                                          keep_statistics=True)
    model.save(base / "bottle.safetensors")
    model.statistics_.save(base / "bottle.stats.safetensors")
    for folder, samples in (("new_images", bottle.test[:3]), ("new_good", bottle.test[:2])):
        (base / folder).mkdir()
        for sample in samples:
            shutil.copy(sample.path, base / folder / f"{sample.defect}_{sample.path.name}")
    return base


def _export(base: Path) -> None:
    """bottle-onnx, for the pages that run an export (once; needs the export extra)."""
    if not (base / "bottle-onnx").exists():
        from padim.cli import main

        assert main(["export", "--model", str(base / "bottle.safetensors"), "--output", str(base / "bottle-onnx")]) == 0


PYTHON_PAGES = sorted({b.page for b in ALL_BLOCKS if b.language == "python"}, key=PAGES.index)


@pytest.mark.parametrize("page", PYTHON_PAGES, ids=[p.name for p in PYTHON_PAGES])
def test_the_python_blocks_run(page, workspace, tmp_path, monkeypatch, request):
    monkeypatch.setenv("PADIM_KEEP_MALLOC", "1")  # a block may tune malloc: not this test process's
    scope, skipped = {"__name__": "__docs__"}, []
    runnable = []
    for block in (b for b in blocks(page) if b.language == "python"):
        missing = [name for name in block.needs if not _importable(name)]
        if missing:
            skipped.append(f"{block.name} needs {', '.join(missing)}")
        else:
            runnable.append(block)
    if any("onnxruntime" in b.needs for b in runnable):
        _export(workspace)
    if any("ray" in b.needs for b in runnable):
        request.getfixturevalue("ray_connected_docs")
    monkeypatch.chdir(shutil.copytree(workspace, tmp_path / "run"))
    for block in runnable:
        code = block.code
        for pattern, replacement in PYTHON_FAST:
            code = re.sub(pattern, replacement, code)
        exec(compile("\n" * block.line + code, str(page), "exec"), scope)
    assert PROMISES.get(page.name, lambda scope: True)(scope)
    if skipped:
        pytest.skip("; ".join(skipped))


def _importable(name: str) -> bool:
    try:
        __import__(name)
        return True
    except ImportError:
        return False


@pytest.fixture
def ray_connected_docs(ray_address):
    """This process connected to the tests' loopback Ray cluster (RayFit("local") then uses it), shut down after."""
    import ray

    from padim.cluster.connect import connect

    connect(ray_address)
    yield
    ray.shutdown()


SHELL_BLOCKS = [b for b in ALL_BLOCKS if b.language == "bash" and b.marker != "illustration"]
RUNNER = """
import contextlib, io, json, os, sys, time
from padim.cli import main
results = []
for step in json.load(open(sys.argv[1])):
    os.chdir(step["cwd"])
    err, started = io.StringIO(), time.perf_counter()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
        try:
            status = main(step["argv"])
        except SystemExit as exc:
            status = exc.code
    results.append({"status": status, "stderr": err.getvalue()[-3000:], "s": round(time.perf_counter() - started, 1)})
print(json.dumps(results))
"""


def _fast(argv: List[str]) -> List[str]:
    """fit and benchmark: random weights at 64 px (every other option as written)."""
    if argv[1] not in ("fit", "benchmark"):
        return argv
    argv = list(argv)
    for flag, value in SHELL_FAST.items():
        if flag in argv:
            argv[argv.index(flag) + 1] = value
        else:
            argv += [flag, value]
    return argv


@pytest.fixture(scope="module")
def shell_runs(workspace, tmp_path_factory):
    """Every runnable bash block's commands, each block in its own copy of the workspace, all in one
    subprocess (one import of torch): {block name: [(command, status, stderr)]}."""
    plan, names, lines = [], [], []
    for block in SHELL_BLOCKS:
        folder = shutil.copytree(workspace, tmp_path_factory.mktemp("shell") / "run")
        for argv in commands(block.code):
            if argv[0] != "padim":
                pytest.fail(f"{block.name}: {' '.join(argv)!r} is not a padim command: mark the block "
                            "<!-- illustration --> or make it runnable")
            plan.append({"cwd": str(folder), "argv": _fast(argv)[1:]})
            names.append(block.name)
            lines.append(" ".join(argv))
    path = tmp_path_factory.mktemp("plan") / "plan.json"
    path.write_text(json.dumps(plan))
    env = {**os.environ, "PADIM_KEEP_MALLOC": "1",
           "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
    done = subprocess.run([sys.executable, "-c", RUNNER, str(path)], capture_output=True, text=True, timeout=600,
                          env=env)
    assert done.returncode == 0, done.stderr[-3000:]
    runs: Dict[str, list] = {}
    results = json.loads(done.stdout.splitlines()[-1])
    print("seconds per command:", [(line, result["s"]) for line, result in zip(lines, results)])
    for name, line, result in zip(names, lines, results):
        runs.setdefault(name, []).append((line, result["status"], result["stderr"]))
    return runs


@pytest.mark.parametrize("block", SHELL_BLOCKS, ids=[b.name for b in SHELL_BLOCKS])
def test_the_bash_blocks_run(block, shell_runs):
    ran = shell_runs[block.name]
    assert ran and [(line, status) for line, status, _ in ran] == [(line, 0) for line, _, _ in ran], \
        "\n".join(stderr for _, status, stderr in ran if status)


def test_the_readme_runs_its_command_line_example():
    assert any(b.page == README and "padim fit" in b.code for b in SHELL_BLOCKS)
