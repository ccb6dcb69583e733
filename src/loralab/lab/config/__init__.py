"""The lab's configuration: ``schema`` (the dataclasses), ``typecheck`` (dict ↔ dataclass), ``toml`` (files and
overrides), ``grid`` (grid points, run ids)."""
