"""Loading text-to-image pipelines: built-ins, hub ids, folders, single files (docs/architecture.md)."""
