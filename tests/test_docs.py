"""The examples in README.md and docs/*.md are still true: every `python -m cbir.<module>` (or
`cbir <command>`) command names a module that exists and its `key=value` overrides compose with
the module's real config; every run-name example is what cbir names a job with the overrides it
shows; every relative link and image points at a file that exists."""

from __future__ import annotations

import importlib.util
import re
import shlex
import traceback
from pathlib import Path

import pytest
from conftest import PROJECT, compose
from hydra.core.hydra_config import HydraConfig
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.errors import MissingConfigException

from cbir import cli
from cbir.job.plan import job_run_name
from cbir.tracking import dashboard

DOCS = [PROJECT / "README.md", *sorted((PROJECT / "docs").glob("*.md"))]
# `python -m cbir.x …` anywhere in a code line or inline code span (after `srun …`, say), `cbir …` at its start
COMMAND = re.compile(r"(?:^|\s)python -m (cbir(?:\.\w+)*)(?=\s|$)(.*)$|^cbir(?=\s|$)(.*)$")
PLACEHOLDER = re.compile(r"<|…|\.\.\.")  # `outputs/<date>/…`, `encoder=...`: not a literal value


def code_lines(text: str) -> list[str]:
    """Indented code lines (continuations joined, comments dropped) and inline code spans."""
    lines, pending = [], ""
    for line in text.splitlines():
        if line.startswith("    ") or pending:
            line = pending + line.strip()
            if line.endswith("\\"):
                pending = line[:-1] + " "
                continue
            pending = ""
            lines.append(re.split(r"\s+#\s", line)[0].strip())
    lines += re.findall(r"`([^`\n]+)`", text)
    return lines


def commands() -> list[tuple[str, str, list[str]]]:
    """(where, module, arguments) of every cbir command in the docs."""
    found = []
    for doc in DOCS:
        for line in code_lines(doc.read_text()):
            match = COMMAND.search(line)
            if not match:
                continue
            module, args = (
                match.group(1),
                shlex.split(match.group(2) or match.group(3) or ""),
            )
            if module is None:  # `cbir <command> …`, as cbir.cli dispatches it
                if args and args[0] in cli.COMMANDS:
                    module = cli.COMMANDS[args.pop(0)][0]
                elif not args or args[0].startswith("-") or "=" in args[0]:
                    module = "cbir.run"
                else:
                    continue  # the word cbir in a sentence
            found.append((f"{doc.relative_to(PROJECT)}: {line}", module, args))
    return found


def config_name(module: str, seen: tuple[str, ...] = ()) -> str:
    """The Hydra config a module's main() composes, read from its source (a package's __init__ or
    __main__, and a command module that only re-exports another module's main)."""
    spec = importlib.util.find_spec(module)
    sources = [Path(spec.origin).read_text()]
    if spec.submodule_search_locations:  # `python -m <package>` runs its __main__
        sources.append(Path(importlib.util.find_spec(f"{module}.__main__").origin).read_text())
    for source in sources:
        if found := re.search(r'config_name="(\w+)"|compose_config\(\s*"(\w+)"', source):
            return next(filter(None, found.groups()))
    for source in sources:
        delegate = re.search(r"from (cbir[\w.]*) import main", source)
        if delegate and delegate.group(1) not in (module, *seen):
            return config_name(delegate.group(1), (*seen, module))
    raise AssertionError(f"{module}: no Hydra config name found in its source")


def override_sets(args: list[str]) -> list[list[str]]:
    """The overrides of each job a command stands for: every value of a sweep appears once."""
    args = [a[1:-1] if a.startswith("[") and a.endswith("]") else a for a in args]  # usage's `[optional]`
    overrides = [a for a in args if "=" in a and not a.startswith("-") and not PLACEHOLDER.search(a)]
    parsed = OverridesParser.create().parse_overrides(overrides)
    first = [
        f"{o.get_key_element()}={next(o.sweep_string_iterator())}" if o.is_sweep_override() else a
        for o, a in zip(parsed, overrides)
    ]
    sets = [first]
    for i, o in enumerate(parsed):
        if o.is_sweep_override():
            sets += [first[:i] + [f"{o.get_key_element()}={v}"] + first[i + 1 :] for v in o.sweep_string_iterator()]
    return sets


def test_the_docs_show_commands():
    found = {module for _, module, _ in commands()}
    assert {
        "cbir.run",
        "cbir.report",
        "cbir.search",
        "cbir.data.prepare",
        "cbir.bench",
    } <= found, found


def test_every_command_names_a_module_and_its_overrides_compose():
    failures = []
    for where, module, args in commands():
        if importlib.util.find_spec(module) is None:
            failures.append(f"{where}\n    no module {module}")
            continue
        name = config_name(module)
        for overrides in override_sets(args):
            try:
                compose(*overrides, config_name=name, hydra_node=True)
            except MissingConfigException:
                if not any(a.startswith("hydra.searchpath=") for a in args):  # options from the user's folder
                    failures.append(f"{where}\n    {overrides}: {traceback.format_exc(limit=0).strip()}")
            except Exception as e:  # noqa: BLE001 (reported with the command it came from)
                failures.append(f"{where}\n    {overrides}: {type(e).__name__}: {str(e).splitlines()[0]}")
    assert not failures, "\n".join(failures)


def run_name_examples() -> list[tuple[str, str]]:
    """(where, name) of every inline example shaped `<encoder> · <index type> · <rows per class> …`."""
    encoders = {p.stem for p in (PROJECT / "conf" / "encoder").glob("*.yaml")}
    index_types = {p.stem for p in (PROJECT / "conf" / "index").glob("*.yaml")}
    found = []
    for doc in DOCS:
        for span in re.findall(r"`([^`\n]+)`", doc.read_text()):
            parts = span.split(dashboard.SEPARATOR)
            if len(parts) >= 3 and parts[0] in encoders and parts[1] in index_types:
                found.append((f"{doc.relative_to(PROJECT)}: {span}", span))
    return found


def overrides_of(name: str) -> tuple[list[str], list[str]]:
    """The overrides a run name shows, and the keys a sweep must vary to name them."""
    encoder, index_type, per_class, *rest = name.split(dashboard.SEPARATOR)
    overrides, swept = (
        [f"encoder={encoder}", f"index={index_type}", f"index.per_class={per_class}"],
        [],
    )
    for word in rest:
        if word == "multi-label":
            overrides.append("dataset.labels=multi")
        elif word.startswith("task="):
            overrides.append(word)
        elif "=" in word:  # a swept key, named by its last part: `input_size=448`
            short, value = word.split("=", 1)
            cfg = compose(*overrides)
            key = next(k for k in ("encoder", "index", "eval", "extract", "dataset") if short in cfg[k])
            overrides.append(f"++{key}.{short}={value}")
            swept.append(f"{key}.{short}")
        else:  # a dataset other than the default
            overrides.append(f"dataset={word}")
    return overrides, swept


def test_run_name_examples_are_what_cbir_names_the_job(monkeypatch):
    examples = run_name_examples()
    assert len(examples) >= 3, examples
    failures = []
    for where, name in examples:
        overrides, swept = overrides_of(name)
        monkeypatch.setenv(dashboard.SWEPT_KEYS_ENV, ",".join(swept))
        cfg = compose(*overrides, hydra_node=True)
        HydraConfig.instance().set_config(cfg)  # as inside a job: the options chosen
        try:
            made = job_run_name(cfg)
        finally:
            HydraConfig.instance().cfg = None
        if made != name:
            failures.append(f"{where}\n    cbir names a job with {overrides}: {made}")
    assert not failures, "\n".join(failures)


@pytest.mark.parametrize("doc", DOCS, ids=lambda p: str(p.relative_to(PROJECT)))
def test_relative_links_and_images_exist(doc):
    for target in re.findall(r"\]\(([^)\s]+)\)", doc.read_text()):
        if re.match(r"[a-z]+:", target):  # https://…, mailto:
            continue
        path, _, anchor = target.partition("#")
        linked = doc.parent / path if path else doc
        assert linked.exists(), f"{doc.relative_to(PROJECT)}: broken link {target}"
        if anchor:
            assert anchor in heading_anchors(linked), f"{doc.relative_to(PROJECT)}: no heading #{anchor} in {path}"


def heading_anchors(page: Path) -> set[str]:
    """The anchors GitHub gives a page's headings: lower case, punctuation dropped, spaces as dashes."""
    return {
        re.sub(r"[^\w\- ]", "", line.lstrip("#").strip().lower()).replace(" ", "-")
        for line in page.read_text().splitlines()
        if line.startswith("#")
    }
