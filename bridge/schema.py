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
