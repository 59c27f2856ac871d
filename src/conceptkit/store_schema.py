"""One manifest schema per artifact kind, shared by the writer (before writing) and every reader.

A manifest is untrusted input: another version, another tool or a hand edit may have written it.
`check_manifest(kind, data)` returns the problems found (an empty list: valid). Schemas accept what
every earlier writer wrote (no `schema` field, the cluster manifest's `model` as a plain string,
harvests without shard checksums); the current writers add `"schema": SCHEMA_VERSION`. Names,
labels and file names from a manifest follow the same rules as a user's (`store.check_name`).
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

SCHEMA_VERSION = 2  # 1 (implicit): manifests written before schemas existed; 2: "schema" field, shard checksums
NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")
SHARD_RE = re.compile(r"^shard-(\d{6})-(\d{6})\.safetensors$")
HEX64_RE = re.compile(r"^[0-9a-f]{64}$")

Check = Callable[[Any], str | None]  # a problem with a value, or None


def is_name(value: Any) -> bool:
    """The `store.check_name` rule: 1-64 letters, digits, '.', '_', '-', first a letter or digit, no '..'."""
    return isinstance(value, str) and bool(NAME_RE.match(value)) and ".." not in value


def _num(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def _int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def number(v: Any) -> str | None:
    return None if _num(v) else "is not a finite number"


def optional_number(v: Any) -> str | None:
    return None if v is None or _num(v) else "is not a number or null"


def integer(minimum: int = 0) -> Check:
    return lambda v: None if _int(v) and v >= minimum else f"is not an integer >= {minimum}"


def boolean(v: Any) -> str | None:
    return None if isinstance(v, bool) else "is not true or false"


def text(v: Any) -> str | None:
    return None if isinstance(v, str) else "is not a string"


def name(v: Any) -> str | None:
    return None if is_name(v) else "is not a valid name (1-64 letters, digits, '.', '_' or '-')"


def mapping(v: Any) -> str | None:
    return None if isinstance(v, dict) else "is not an object"


def list_of(item: Check, nonempty: bool = False) -> Check:
    def check(v: Any) -> str | None:
        if not isinstance(v, list):
            return "is not a list"
        if nonempty and not v:
            return "is empty"
        for i, x in enumerate(v):
            problem = item(x)
            if problem:
                return f"item {i} {problem}"
        return None

    return check


def map_of(value: Check) -> Check:
    def check(v: Any) -> str | None:
        if not isinstance(v, dict):
            return "is not an object"
        for k, x in v.items():
            problem = value(x)
            if problem:
                return f"entry {k!r} {problem}"
        return None

    return check


def record(fields: dict[str, tuple[Check, bool]]) -> Check:
    """An object whose listed fields pass their checks; (check, required). Other fields pass."""

    def check(v: Any) -> str | None:
        if not isinstance(v, dict):
            return "is not an object"
        for key, (fn, required) in fields.items():
            if key not in v:
                if required:
                    return f"lacks {key!r}"
                continue
            problem = fn(v[key])
            if problem:
                return f"field {key!r} {problem}"
        return None

    return check


def nullable(check: Check) -> Check:
    return lambda v: None if v is None else check(v)


def one_of(*checks: Check) -> Check:
    def check(v: Any) -> str | None:
        problems = [c(v) for c in checks]
        return None if any(p is None for p in problems) else " and ".join(p for p in problems if p)

    return check


def shard_file_name(v: Any) -> str | None:
    return None if isinstance(v, str) and SHARD_RE.match(v) else "is not a shard file name (shard-NNNNNN-NNNNNN.safetensors)"


def sha256_digest(v: Any) -> str | None:
    return None if isinstance(v, str) and HEX64_RE.match(v) else "is not a sha256 hex digest"


def file_name(suffix: str) -> Check:
    """A plain file name inside the artifact folder (no folders, no '..'), ending in `suffix`."""
    return lambda v: None if is_name(v) and v.endswith(suffix) else f"is not a plain {suffix} file name"


@dataclass(frozen=True)
class Schema:
    """The fields a kind's manifest may carry: name -> (check, required)."""

    kind: str
    fields: dict[str, tuple[Check, bool]]


MODEL = record({"spec": (text, True), "fingerprint": (text, False), "arch": (text, False)})
COMMON: dict[str, tuple[Check, bool]] = {
    "kind": (text, False), "key": (text, False), "conceptkit_version": (text, False), "schema": (integer(1), False),
    "created": (number, False), "updated": (number, False), "complete": (boolean, False),
    "prompts": (list_of(text), False), "prompt": (nullable(text), False), "seconds": (optional_number, False),
}
SIZE = record({"height": (integer(1), False), "width": (integer(1), False), "guidance": (number, False),
               "steps": (integer(1), False), "seed": (integer(-(2**63)), False)})

SCHEMAS = {
    "harvest": Schema("harvest", {
        "model": (MODEL, True), "prompts": (list_of(text, nonempty=True), True), "settings": (SIZE, True),
        "samples": (integer(0), False), "steps": (integer(1), False), "timesteps": (list_of(integer(0)), False),
        "record": (list_of(lambda v: None if v in ("x0", "xt") else "is not x0 or xt"), False),
        "shards": (list_of(shard_file_name), False), "checksums": (map_of(sha256_digest), False), "bytes": (integer(0), False),
        "versions": (mapping, False),
    }),
    "neurons": Schema("neurons", {
        "model": (MODEL, True), "harvest": (name, True), "prompts": (list_of(text, nonempty=True), True),
        "timesteps": (list_of(integer(0), nonempty=True), True),
        "blocks": (list_of(record({"layer": (text, True), "proj": (text, True), "start": (integer(0), True),
                                   "stop": (integer(1), True), "height": (integer(1), False),
                                   "width": (integer(1), False)}), nonempty=True), True),
        "num_train_timesteps": (integer(1), False), "n_neurons": (integer(1), False), "settings": (mapping, False),
        "concept_tokens": (list_of(list_of(text)), False), "bytes": (integer(0), False),
        "bytes_per_step": (integer(0), False), "references": (integer(0), False), "reference": (mapping, False),
    }),
    "cluster": Schema("cluster", {
        # the first writers stored the model spec as a string; newer ones may store the identity
        "model": (one_of(text, MODEL), True), "neurons": (name, True), "harvest": (name, False),
        "prompts": (list_of(text), False), "k": (integer(1), True), "temporal_dim": (integer(1), True),
        "arrays": (map_of(text), False), "images": (map_of(nullable(text)), False),
        "clusters": (list_of(mapping), False), "metrics": (mapping, False), "embedding": (nullable(mapping), False),
    }),
    "evaluate": Schema("evaluate", {
        "what": (text, False), "arrays": (map_of(text), False), "encoder": (text, False),
    }),
    "implant": Schema("implant", {
        "token": (text, True), "init_word": (text, True), "method": (text, True), "model": (MODEL, True),
        "file": (file_name(".safetensors"), True), "count": (integer(1), False), "image_files": (list_of(text), False),
        "height": (integer(1), False), "width": (integer(1), False), "settings": (mapping, False),
        "templates": (list_of(text), False), "loss": (map_of(optional_number), False),
        "temporal_dim": (integer(1), False), "temporal_file": (file_name(".safetensors"), False),
        "layers_file": (file_name(".safetensors"), False), "layers": (list_of(text), False),
    }),
    "sliders": Schema("sliders", {
        "name": (name, True), "prompt": (text, True), "model": (MODEL, True), "encoder": (text, True),
        "settings": (record({"rank": (integer(1), True), "alpha": (number, True), "targets": (text, True)}), True),
        "settings_key": (text, False), "harvest": (text, False),
        "guidance": (number, False), "steps": (integer(1), False), "height": (integer(1), False),
        "width": (integer(1), False), "start": (number, False), "label_method": (text, False),
        "loss": (map_of(optional_number), False), "directions": (list_of(list_of(number)), False),
        "versions": (mapping, False), "calibration": (record({"scale": (number, True)}), False),
        "sliders": (list_of(record({
            "index": (integer(0), True), "label": (name, True), "file": (file_name(".safetensors"), True),
            "explained_variance": (number, True), "effect_size": (number, False), "alignment": (number, False),
            "label_score": (number, False),
        }), nonempty=True), True),
    }),
}


def check_manifest(kind: str, data: Any) -> list[str]:
    """The problems of a manifest of `kind` (empty when it is valid)."""
    if not isinstance(data, dict):
        return [f"manifest is a {type(data).__name__}, not an object"]
    schema = SCHEMAS.get(kind)
    fields = {**COMMON, **(schema.fields if schema else {})}
    problems = []
    for key, (fn, required) in fields.items():
        if key not in data:
            if required:
                problems.append(f"lacks {key!r}")
            continue
        problem = fn(data[key])
        if problem:
            problems.append(f"field {key!r} {problem}")
    if "kind" in data and data["kind"] != kind:
        problems.append(f"field 'kind' is {data['kind']!r}, expected {kind!r}")
    if kind == "sliders" and not problems:
        problems += _slider_set_problems(data)
    return problems


def _slider_set_problems(m: dict[str, Any]) -> list[str]:
    """Cross-field rules of a slider set: indices 0..K-1 in order, labels and files unique."""
    sliders = m["sliders"]
    out = []
    if [s["index"] for s in sliders] != list(range(len(sliders))):
        out.append("slider indices are not 0..K-1 in order")
    labels = [s["label"].lower() for s in sliders]
    if len(set(labels)) != len(labels):
        out.append("slider labels are not unique")
    files = [s["file"] for s in sliders]
    if len(set(files)) != len(files):
        out.append("slider files are not unique")
    return out


def model_spec(model: Any) -> str:
    """The model spec of a manifest's `model` field, old string form or identity object."""
    if isinstance(model, dict):
        return str(model.get("spec", ""))
    return str(model) if isinstance(model, str) else ""
