"""The one YAML reader of the suite: recipes, `--set` values, a run's config.yaml, a comparison's
comparison.yaml (and any YAML file added later) are all read through `load_yaml` / `read_yaml_file`.

A YAML file is untrusted input, and PyYAML's safe loader has three gaps this reader closes:
- **nesting**: its composer recurses once per level, so 50,000 `[` end in a RecursionError traceback; here
  a document nesting deeper than MAX_DEPTH levels is refused at the level that crosses the bound, before
  the rest is even scanned;
- **duplicate keys**: `{a: 1, a: 2}` silently keeps the last one (two `train:` blocks of a recipe become the
  second alone); here a key given twice in one mapping is an error naming the key and both lines (keys
  that merge in through `<<:` may still be overridden, as YAML intends);
- **values its constructors cannot build** (a date `2001-13-01`, an integer of a million digits) raise
  ValueError, not YAMLError; here they are one line like any other malformed YAML.

Every problem is a UserError: `{source} {what is wrong}; {fix}`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml
from yaml.nodes import MappingNode, ScalarNode

from .errors import UserError, one_line

MAX_DEPTH = 32  # levels of nested mappings and lists; a recipe uses 3, config.yaml and comparison.yaml 4
MAX_YAML_BYTES = 1_000_000  # a recipe or a run's config.yaml is a few kB
MERGE_TAG = "tag:yaml.org,2002:merge"


class MalformedYaml(UserError):
    """Text that does not parse as YAML (`--set` keeps such a value as the string it is)."""


class _TooDeep(Exception):
    def __init__(self, mark):
        super().__init__(mark)
        self.mark = mark


class _DuplicateKey(Exception):
    def __init__(self, key, first_line: int, second_line: int):
        super().__init__(key)
        self.key, self.first_line, self.second_line = key, first_line, second_line


class BoundedSafeLoader(yaml.SafeLoader):
    """yaml.SafeLoader that counts the levels it composes and refuses keys given twice in one mapping."""

    def __init__(self, stream):
        super().__init__(stream)
        self._depth = 0

    def compose_node(self, parent, index):
        self._depth += 1
        try:
            if self._depth > MAX_DEPTH:
                raise _TooDeep(self.peek_event().start_mark)
            return super().compose_node(parent, index)
        finally:
            self._depth -= 1

    def construct_mapping(self, node, deep=False):
        if isinstance(node, MappingNode):  # before the merge keys are flattened in: only the mapping's own keys
            seen: dict = {}  # key -> the line it was first given on
            for key_node, _ in node.value:
                if key_node.tag == MERGE_TAG or not isinstance(key_node, ScalarNode):
                    continue  # a non-scalar key is refused (unhashable) by the constructor itself
                key, line = self.construct_object(key_node), key_node.start_mark.line + 1
                try:
                    if key in seen:
                        raise _DuplicateKey(key, seen[key], line)
                    seen[key] = line
                except TypeError:  # unhashable: the constructor refuses it
                    continue
        return super().construct_mapping(node, deep)


def load_yaml(text: str, source: str, fix: str = "") -> Any:
    """The YAML document in `text` (plain data: dicts, lists, scalars); a UserError naming `source` (e.g.
    "recipe r.yaml") when it is malformed, nests deeper than MAX_DEPTH or gives a key twice. `fix` ends the
    message (how to get a good file); each problem has its own when it is empty."""
    def fail(problem: str, default_fix: str, kind=UserError):
        how = fix or default_fix
        return kind(f"{source} {problem}" + (f"; {how}" if how else ""))

    loader = None
    try:
        loader = BoundedSafeLoader(text)  # its reader refuses control characters here already
        return loader.get_single_data()
    except _TooDeep as exc:
        raise fail(f"nests deeper than {MAX_DEPTH} levels (at line {exc.mark.line + 1}, column "
                   f"{exc.mark.column + 1})", "write it with fewer nested lists and mappings") from None
    except _DuplicateKey as exc:
        lines = (f"at lines {exc.first_line} and {exc.second_line}" if exc.first_line != exc.second_line
                 else f"twice on line {exc.first_line}")
        raise fail(f"gives the key {_shown_key(exc.key)} twice in one mapping ({lines})",
                   "keep one of them (YAML would silently use the last)") from None
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = getattr(exc, "problem", None) or "invalid YAML"
        raise fail(f"is not valid YAML{where}: {one_line(problem, 200)}", "", MalformedYaml) from None
    except (ValueError, OverflowError) as exc:  # a value a constructor cannot build: a date 2001-13-01, ...
        raise fail(f"is not valid YAML: {one_line(exc, 200)}", "", MalformedYaml) from None
    finally:
        if loader is not None:
            loader.dispose()


def _shown_key(key) -> str:
    return f"'{key}'" if isinstance(key, str) else repr(key)


def read_yaml_file(path: Path, source: str, fix: str = "", max_bytes: int = MAX_YAML_BYTES) -> Any:
    """`load_yaml` of the UTF-8 file at `path`, refused unread above `max_bytes`."""
    path = Path(path)
    try:
        if path.stat().st_size > max_bytes:
            raise UserError(f"{source} is larger than {max_bytes // 1000} kB; "
                            + (fix or "it is a short YAML file: give the right file"))
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise UserError(f"cannot read {source}: {exc.strerror or exc}" + (f"; {fix}" if fix else "")) from None
    except UnicodeDecodeError as exc:
        raise UserError(f"{source} is not UTF-8 text (byte {exc.start}); save it as UTF-8 YAML") from None
    return load_yaml(text, source, fix)
