"""The task-family registry: ``task.name`` -> its family, the one place that maps names to families.

Adding a family is one module here (its config section, ``spec``, and either
``sample``/``decode`` or ``load``/``split_classes``/``to_array``; see tasks/family.py)
plus one entry in ``FAMILIES``; the config union ``TaskConfig`` is derived from it.
"""
from __future__ import annotations

import dataclasses
from typing import Annotated, Any, Union

from pydantic import Discriminator, Tag

from tasks.families import (
    digits,
    image_folder,
    miniimagenet,
    omniglot,
    quadratic,
    sinusoid,
)
from tasks.family import Family, Strict, TaskSpec

FAMILIES: dict[str, Family] = {
    "sinusoid": sinusoid.FAMILY,
    "quadratic": quadratic.FAMILY,
    "omniglot": omniglot.FAMILY,
    "miniimagenet": miniimagenet.FAMILY,
    "digits": digits.FAMILY,
    "image_folder": image_folder.FAMILY,
}


def _name(value: Any) -> str | None:
    return value.get("name") if isinstance(value, dict) else getattr(value, "name", None)


TaskConfig = Annotated[
    Union[tuple(Annotated[f.config, Tag(name)] for name, f in FAMILIES.items())],  # noqa: UP007 - built from the registry
    Discriminator(_name, custom_error_type="task_name", custom_error_message=f"task.name must be one of {sorted(FAMILIES)}"),
]
"""The ``task`` section: one of the registered families' configs, chosen by ``name``."""


def family(task: Strict) -> Family:
    """The family of a validated task config."""
    return FAMILIES[task.name]


def spec(task: Strict) -> TaskSpec:
    """The properties ``task`` declares (kind, input shape, outputs, loss)."""
    return dataclasses.replace(family(task).spec(task), family=task.name)
