"""The outbound path over real stores: the store contract suite's backends (every test taking
`store` runs on each)."""

from tests.store.conftest import backend, postgres, sqlite_file, sqlite_memory, store

__all__ = ["backend", "postgres", "sqlite_file", "sqlite_memory", "store"]
