"""A small JSON-Schema subset: validates request bodies and documents them in
the OpenAPI spec from the same dicts. Errors name the offending field."""
from __future__ import annotations

import re
from typing import Any


class SchemaError(ValueError):
    def __init__(self, field: str, message: str, code: str = "invalid_field"):
        super().__init__(f"{field}: {message}")
        self.field = field
        self.message = message
        self.code = code


# Formats a caller's words must satisfy before they reach anyone's API.
FORMATS = {
    "e164": (re.compile(r"^\+[1-9][0-9]{6,14}$"), "a phone number in E.164 form, like +15551234567"),
    "email": (re.compile(r"^[^@\s]{1,64}@[A-Za-z0-9-]+(\.[A-Za-z0-9-]+)+$"), "an email address"),
    "date": (re.compile(r"^[0-9]{4}-(0[1-9]|1[0-2])-(0[1-9]|[12][0-9]|3[01])$"), "a date like 2026-11-30"),
    "time": (re.compile(r"^([01][0-9]|2[0-3]):[0-5][0-9]$"), "a time like 14:30"),
}

_TYPES = {"string": str, "integer": int, "number": (int, float), "boolean": bool, "object": dict, "array": list}


def validate(value: Any, schema: dict, path: str = "") -> None:
    t = schema.get("type")
    name = path or "body"
    if t:
        py = _TYPES[t]
        if isinstance(value, bool) and t in ("integer", "number"):
            raise SchemaError(name, f"expected {t}", "wrong_type")
        if not isinstance(value, py):
            raise SchemaError(name, f"expected {t}", "wrong_type" if path else "invalid_body")
    if "enum" in schema and value not in schema["enum"]:
        raise SchemaError(name, f"must be one of {', '.join(map(str, schema['enum']))}")
    if t == "string":
        if len(value) < schema.get("minLength", 0):
            raise SchemaError(name, f"must be at least {schema['minLength']} characters")
        if "maxLength" in schema and len(value) > schema["maxLength"]:
            raise SchemaError(name, f"must be at most {schema['maxLength']} characters")
        if "pattern" in schema and not re.search(schema["pattern"], value):
            raise SchemaError(name, f"does not match {schema['pattern']}")
        fmt = FORMATS.get(schema.get("format", ""))
        if fmt and not fmt[0].match(value):
            raise SchemaError(name, f"must be {fmt[1]}", "bad_format")
    if t in ("integer", "number"):
        if "minimum" in schema and value < schema["minimum"]:
            raise SchemaError(name, f"must be >= {schema['minimum']}")
        if "maximum" in schema and value > schema["maximum"]:
            raise SchemaError(name, f"must be <= {schema['maximum']}")
    if t == "array":
        if len(value) < schema.get("minItems", 0):
            raise SchemaError(name, f"needs at least {schema['minItems']} items")
        for i, item in enumerate(value):
            validate(item, schema.get("items", {}), f"{name}[{i}]")
    if t == "object":
        props = schema.get("properties", {})
        for key in schema.get("required", []):
            if key not in value:
                raise SchemaError(f"{path + '.' if path else ''}{key}", "is required", "missing_field")
        if schema.get("additionalProperties") is False:
            for key in value:
                if key not in props:
                    raise SchemaError(f"{path + '.' if path else ''}{key}", "unknown field", "unknown_field")
        for key, sub in props.items():
            if key in value:
                validate(value[key], sub, f"{path + '.' if path else ''}{key}")


def obj(required: list[str] | None = None, **props) -> dict:
    out = {"type": "object", "properties": props, "additionalProperties": False}
    if required:
        out["required"] = required
    return out
