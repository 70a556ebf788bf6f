"""Doc check: every ``python -m`` command in README.md and serving/README.md names a module
that exists and arguments its parser accepts, and the README's test command is what CI runs.

Each command's ``main(argv)`` is called with the documented arguments (optional ``[...]``
parts and ``# comments`` removed) and stopped right after argument parsing: the end-to-end
tests run the commands themselves on tiny data; this test keeps the documentation in step
with the parsers.
"""

from __future__ import annotations

import argparse
import importlib
import pathlib
import re
import shlex

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
DOCS = ("README.md", "serving/README.md")


def _commands() -> list[tuple[str, str]]:
    out = []
    for doc in DOCS:
        text = (ROOT / doc).read_text()
        for block in re.findall(r"```bash\n(.*?)```", text, flags=re.S):
            lines = block.replace("\\\n", " ").splitlines()
            for line in lines:
                line = line.split(" # ")[0].strip()
                for part in line.split("&&"):
                    part = part.strip()
                    if re.match(r"^(\S+=\S+\s+)*python -m ", part):
                        out.append((doc, re.sub(r"^(\S+=\S+\s+)*", "", part)))
    return out


COMMANDS = _commands()


class _StopAfterParsingError(Exception):
    pass


def test_the_readme_documents_commands():
    assert len(COMMANDS) >= 15
    modules = {shlex.split(c)[2] for _, c in COMMANDS}
    assert {"muse_tf.train", "muse_tf.compare", "muse_tf.export", "beam.build_dataset",
            "serving.server", "serving.client"} <= modules


def parses(command: str, monkeypatch: pytest.MonkeyPatch) -> bool:
    """Whether ``python -m MODULE ARGS`` gets past its argument parser."""
    command = re.sub(r"\[[^\[\]]*\]", "", command)  # optional parts
    args = shlex.split(command)
    module_name, argv = args[2], args[3:]
    module = importlib.import_module(module_name)
    if not hasattr(module, "main"):
        module = importlib.import_module(f"{module_name}.__main__")
    parse_args = argparse.ArgumentParser.parse_args
    parse_known_args = argparse.ArgumentParser.parse_known_args
    depth = [0]

    def parse_args_and_stop(self, args=None, namespace=None):
        depth[0] += 1
        try:
            parse_args(self, args, namespace)
        finally:
            depth[0] -= 1
        raise _StopAfterParsingError

    def parse_known_args_and_stop(self, args=None, namespace=None):
        result = parse_known_args(self, args, namespace)
        if depth[0]:  # inside parse_args (or a sub-command): it checks what is left
            return result
        # A parse_known_args caller (Beam) hands the rest to its pipeline options.
        raise _StopAfterParsingError

    with monkeypatch.context() as patch:
        patch.setattr(argparse.ArgumentParser, "parse_args", parse_args_and_stop)
        patch.setattr(argparse.ArgumentParser, "parse_known_args", parse_known_args_and_stop)
        try:
            module.main(argv)
        except _StopAfterParsingError:
            return True
        except SystemExit as exit_info:
            return exit_info.code in (0, None)
    return True


def test_the_check_rejects_a_bad_flag(monkeypatch, capsys):
    assert parses("python -m muse_tf.train --epochs 2", monkeypatch)
    assert not parses("python -m muse_tf.train --no-such-flag", monkeypatch)
    assert not parses("python -m muse_tf.compare ablation table9 --data D", monkeypatch)


@pytest.mark.parametrize("doc,command", COMMANDS, ids=[c for _, c in COMMANDS])
def test_documented_command_parses(doc, command, monkeypatch):
    assert parses(command, monkeypatch), f"{doc}: `{command}` is rejected by its parser"


def test_readme_test_command_is_what_ci_runs():
    readme = (ROOT / "README.md").read_text()
    ci = (ROOT / ".ci" / "run").read_text()
    command = 'pip install -q -e ".[dev]" && ruff check . && python -m pytest -q'
    assert command in ci
    assert command.replace(" -q -e", " -e") in readme
