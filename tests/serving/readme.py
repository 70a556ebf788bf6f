"""serving/README.md as data: its commands (```` ```bash ```` blocks, one per line), its JSON
request files (```` ```json NAME ```` blocks) and its Python snippets, for the tests that run
them (:mod:`tests.serving.test_readme`, and the training commands in ``conftest.py``)."""

from __future__ import annotations

import dataclasses
import os
import re
import shlex
from collections.abc import Mapping

SERVING_DIR = os.path.join(os.path.dirname(__file__), os.pardir, os.pardir, "serving")
README = os.path.join(SERVING_DIR, "README.md")
#: The address the README's commands send to (replaced by a test server's).
DOCUMENTED_ADDRESS = "127.0.0.1:8500"
#: Shrinks the README's training commands to tiny sizes (appended as ``--set`` flags).
TINY_TRAINING = ["data.batch_size=8", "model.top_k=4", "model.id_embedding_dim=4",
                 "model.tower_units=[16]", "model.short_term_len=4", "train.epochs=1",
                 "train.verbose=0", "model.num_tiers=4", "model.head_dim=4",
                 "retrieval.top_n=8", "retrieval.beam_width=4"]


@dataclasses.dataclass(frozen=True)
class Readme:
    commands: tuple[str, ...]
    json_files: dict[str, str]
    python_blocks: tuple[str, ...]

    def commands_of(self, program: str) -> list[str]:
        return [c for c in self.commands if program_of(c) == program]


def parse(path: str = README) -> Readme:
    with open(path) as f:
        text = f.read()
    commands, json_files, python_blocks = [], {}, []
    for info, body in re.findall(r"^```([^\n]*)\n(.*?)^```", text, flags=re.S | re.M):
        words = info.split()
        kind = words[0] if words else ""
        if kind == "bash":
            for line in body.replace("\\\n", " ").splitlines():
                if line.strip():
                    commands.append(line.strip())
        elif kind == "json":
            assert len(words) == 2, f"a JSON block names its file: ```json NAME, got {info!r}"
            json_files[words[1]] = body
        elif kind == "python":
            python_blocks.append(body)
    return Readme(tuple(commands), json_files, tuple(python_blocks))


def substitute(text: str, variables: Mapping[str, str]) -> str:
    """``$NAME`` -> ``variables[NAME]`` (longest names first)."""
    for name in sorted(variables, key=len, reverse=True):
        text = text.replace(f"${name}", variables[name])
    return text


def program_of(command: str) -> str:
    """``serving.client`` for ``python -m serving.client ...``; else the first word after
    leading ``NAME=value`` assignments (``docker``, ``curl``)."""
    words = [w for w in shlex.split(command) if not re.match(r"^[A-Z_]+=", w)]
    if words[:2] == ["python", "-m"]:
        return words[2]
    return words[0]


def argv(command: str, variables: Mapping[str, str]) -> list[str]:
    """The arguments after ``python -m MODULE``, variables substituted."""
    words = shlex.split(substitute(command, variables))
    assert words[:2] == ["python", "-m"], command
    return words[3:]
