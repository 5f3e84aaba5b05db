"""Config errors that name fields, not flags: the command line maps fields to its flags."""

from __future__ import annotations

from collections.abc import Mapping


class FieldError(ValueError):
    """A config value that cannot work, in one line.

    `template` names the fields involved as ``{field}`` placeholders (listed in `fields`) and
    may hold other placeholders filled from `values`. ``str()`` shows the field names;
    ``render(names)`` shows each field as ``names[field]`` (the command line: its flag).
    """

    def __init__(self, template: str, *fields: str, **values):
        self.template, self.fields, self.values = template, fields, values
        super().__init__(self.render())

    def render(self, names: Mapping[str, str] | None = None) -> str:
        names = names or {}
        return self.template.format(**{f: names.get(f, f) for f in self.fields}, **self.values)
