"""Which settings enter a cache key and a manifest, declared once, on the settings dataclasses.

A run's settings dataclass is its cache key's source: every field enters the key unless its
`field(metadata=...)` says otherwise:

- `IN_MANIFEST_ONLY`: recorded in the manifest, left out of the key (how many samples a harvest
  holds, a set's name: they do not change what is computed);
- `NOT_RECORDED`: neither (a batch size, `--overwrite`: how the run goes, not what it makes);
- `NULL_IN_KEY`: the key records the field as null (the evaluations' keys have always held
  `"batch_size": null`; caches written before stay valid);
- `IN_KEY_UNLESS_DEFAULT`: a setting added later enters the key only when it differs from its
  default, so the keys of caches written before it existed stay what they were.
"""

from __future__ import annotations

from dataclasses import asdict, fields
from typing import Any

IN_MANIFEST_ONLY = {"key": "omit"}
NOT_RECORDED = {"key": "omit", "manifest": "omit"}
NULL_IN_KEY = {"key": "null", "manifest": "omit"}
IN_KEY_UNLESS_DEFAULT = {"key": "unless-default"}


def _settings(cfg, where: str) -> dict[str, Any]:
    full = asdict(cfg)
    out = {}
    for f in fields(cfg):
        how = f.metadata.get(where, "keep")
        if how == "unless-default" and full[f.name] == f.default:
            continue
        if how != "omit":
            out[f.name] = None if how == "null" else full[f.name]
    return out


def key_settings(cfg) -> dict[str, Any]:
    """The settings that determine the result: the cache key's."""
    return _settings(cfg, "key")


def manifest_settings(cfg) -> dict[str, Any]:
    """The settings a manifest records."""
    return _settings(cfg, "manifest")
