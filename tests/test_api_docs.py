"""docs/api.md lists every public name, every parameter of each function and class, and every
field of each result dataclass (with a unit or meaning)."""

from __future__ import annotations

import dataclasses
import inspect
import os
import re

import pytest
from models import TESTDATA

import graphrewrite

PAGE = os.path.join(os.path.dirname(TESTDATA), "docs", "api.md")


def sections() -> dict[str, str]:
    with open(PAGE, encoding="utf-8") as f:
        text = f.read()
    parts = re.split(r"^## `([^`]+)`\n", text, flags=re.M)
    return dict(zip(parts[1::2], parts[2::2]))


def rows(section: str) -> dict[str, list[str]]:
    """Table rows of a section: first cell's name -> the other cells."""
    found = {}
    for line in section.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        name = re.fullmatch(r"`(\w+)`", cells[0]) if line.startswith("|") else None
        if name:
            found[name.group(1)] = cells[1:]
    return found


def test_every_public_name_has_a_section():
    assert sorted(sections()) == sorted(graphrewrite.__all__)


@pytest.mark.parametrize("name", [n for n in graphrewrite.__all__ if n != "__version__"])
def test_every_parameter_and_field_is_documented(name):
    obj = getattr(graphrewrite, name)
    documented = rows(sections()[name])
    if dataclasses.is_dataclass(obj):
        expected = [f.name for f in dataclasses.fields(obj)]
    else:
        expected = [p for p in inspect.signature(obj).parameters if p not in ("self", "kwargs")]
    assert expected and list(documented) == expected
    for cells in documented.values():
        assert len(cells) == 2 and all(cells), cells  # a type and a meaning (with its unit)
