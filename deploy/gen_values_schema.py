"""Rewrite the `config` section of helm/mrict-dask/values.schema.json from mrict_dask/config.py.

    python deploy/gen_values_schema.py

Run it after adding, removing or retyping a config field (tests/test_deploy.py fails until then), so a typo in
a release's pipeline config fails at `helm install`, not after the cluster is up. The rest of the schema is
edited by hand.
"""

from __future__ import annotations

import dataclasses
import json
import types
import typing
from pathlib import Path

from mrict_dask import config as C

SCHEMA = Path(__file__).resolve().parents[1] / "helm" / "mrict-dask" / "values.schema.json"


def _type_schema(tp: typing.Any, default: typing.Any) -> dict:
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        (inner,) = [a for a in typing.get_args(tp) if a is not type(None)]
        return {"anyOf": [_type_schema(inner, default), {"type": "null"}]}
    if tp in (bool, int, float, str):
        return {"type": {bool: "boolean", int: "integer", float: "number", str: "string"}[tp]}
    if origin is tuple:
        args = typing.get_args(tp)
        if len(args) == 2 and args[1] is Ellipsis:
            if isinstance(default, str):  # annotated as a tuple but the default (what the code sees) is one string
                return {"type": "string"}
            return {"type": "array", "items": _type_schema(args[0], None)}
        return {"type": "array", "items": _type_schema(args[0], None), "minItems": len(args), "maxItems": len(args)}
    raise TypeError(f"no JSON schema for config type {tp!r}")


def _section(cls: type) -> dict:
    hints = typing.get_type_hints(cls)
    defaults = cls()
    return {"type": "object", "additionalProperties": False,
            "properties": {f.name: _type_schema(hints[f.name], getattr(defaults, f.name))
                           for f in dataclasses.fields(cls)}}


def config_schema() -> dict:
    root = C.Config()
    return {"type": "object", "additionalProperties": False,
            "description": "Pipeline config (mrict_dask/config.py), rendered into a ConfigMap; "
                           "unknown keys are refused.",
            "properties": {f.name: _section(type(getattr(root, f.name))) for f in dataclasses.fields(C.Config)}}


def main() -> None:
    schema = json.loads(SCHEMA.read_text())
    schema["properties"]["config"] = config_schema()
    SCHEMA.write_text(json.dumps(schema, indent=2) + "\n")
    print(f"updated {SCHEMA}")


if __name__ == "__main__":
    main()
