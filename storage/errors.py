"""The storage layer's error, in a module of its own so that any caller (the CLI's error
handler) can catch it without importing a database driver."""


class StorageError(RuntimeError):
    """The database cannot be used (locked too long, disk full, corrupt): an operator issue."""
