"""The served class list of a repository: class ids, names, removed classes and thresholds, as the
configs carry them (prompt_bank's and the ensembles' parameters, which the server and the clients read)
and as manifest.json records them.

Class ids are stable for ever. Adding appends an id; removing never shifts one: the class's entry in
`class_names` becomes contract.REMOVED_CLASS and its name moves to `removed_classes`, its table rows
stay. A client holding a stale list would otherwise send a frame with an id that now means another
product and get a verdict against the wrong prompts, silently. Re-adding a removed name gives it a new id.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field, replace
from pathlib import Path

from promptmad import contract
from promptmad.errors import ConfigError, ServeError
from promptmad.export.repository_edit import read_config, write_config

NAME_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}")  # no path characters, no leading dot
_MODELS = (contract.PROMPT_BANK.name, *(e.name for e in contract.ENSEMBLES))  # the configs that carry the list


def check_name(name: str, field_name: str = "name") -> str:
    if not isinstance(name, str) or not NAME_PATTERN.fullmatch(name):
        raise ConfigError(field_name, f"{name!r}: a class name is 1-64 letters, digits, '_', '-' or '.', starting with a "
                          "letter or digit (no '/', spaces or empty names)")
    return name


def _param(cfg, key: str, default: str) -> object:
    return json.loads(cfg.parameters[key].string_value) if key in cfg.parameters else json.loads(default)


@dataclass(frozen=True)
class ClassTable:
    """names[i] is class i's name (contract.REMOVED_CLASS once removed); removed maps the ids of
    removed classes to the names they had; thresholds are those of the served classes."""

    names: tuple[str, ...]
    removed: dict[int, str] = field(default_factory=dict)
    thresholds: dict[str, float] = field(default_factory=dict)

    @classmethod
    def read(cls, repo: Path) -> "ClassTable":
        """From the configs of `repo`; ServeError if prompt_bank and the ensemble disagree."""
        repo = Path(repo)
        bank = read_config(repo / contract.PROMPT_BANK.name / "config.pbtxt")
        ens = read_config(repo / contract.MODEL_NAME / "config.pbtxt")
        names = tuple(_param(bank, contract.PARAM_CLASS_NAMES, "[]"))
        if tuple(_param(ens, contract.PARAM_CLASS_NAMES, "[]")) != names:
            raise ServeError(f"{repo}: prompt_bank and {contract.MODEL_NAME} list different classes; re-run `promptmad export`")
        removed = {int(k): v for k, v in _param(ens, contract.PARAM_REMOVED_CLASSES, "{}").items()}
        thresholds = {k: float(v) for k, v in _param(ens, contract.PARAM_THRESHOLDS, "{}").items()}
        return cls(names, removed, thresholds)

    @property
    def live(self) -> dict[str, int]:
        """Served class name -> id."""
        return {n: i for i, n in enumerate(self.names) if n != contract.REMOVED_CLASS and i not in self.removed}

    def threshold(self, name: str) -> float:
        return float(self.thresholds.get(name, contract.DEFAULT_THRESHOLD))

    def added(self, name: str, threshold: float) -> "ClassTable":
        """The table with `name` appended (a new id); ConfigError if it is served already."""
        check_name(name)
        if name in self.live:
            raise ConfigError("name", f"{name!r} is served already (id {self.live[name]}); pick another name, or "
                              f"`promptmad classes remove --name {name}` first (it will get a new id)")
        return replace(self, names=(*self.names, name), thresholds={**self.thresholds, name: float(threshold)})

    def without(self, name: str) -> "ClassTable":
        """The table with `name` removed (tombstone: its id stays taken); ConfigError if not served."""
        if name not in self.live:
            served = ", ".join(self.live) or "none"
            raise ConfigError("name", f"{name!r} is not a served class (served: {served}); see `promptmad classes list`")
        cid = self.live[name]
        names = tuple(contract.REMOVED_CLASS if i == cid else n for i, n in enumerate(self.names))
        thresholds = {k: v for k, v in self.thresholds.items() if k != name}
        return replace(self, names=names, removed={**self.removed, cid: name}, thresholds=thresholds)

    def write(self, repo: Path) -> None:
        """Into the configs of prompt_bank and both ensembles (files replaced, see repository_edit).
        The JSON is written as export writes it (json.dumps defaults)."""
        params = {contract.PARAM_CLASS_NAMES: list(self.names), contract.PARAM_REMOVED_CLASSES: {str(k): v for k, v in sorted(self.removed.items())}}
        for model in _MODELS:
            path = Path(repo) / model / "config.pbtxt"
            cfg = read_config(path)
            values = params if model == contract.PROMPT_BANK.name else {**params, contract.PARAM_THRESHOLDS: self.thresholds}
            for key, value in values.items():
                cfg.parameters[key].string_value = json.dumps(value)
            write_config(path, cfg)

    def manifest_fields(self) -> dict:
        """What manifest.json records of the class list (export's `classes` and `thresholds`, plus the removed)."""
        return {"classes": dict(self.live), "thresholds": dict(self.thresholds),
                "removed_classes": {str(k): v for k, v in sorted(self.removed.items())}}
