"""The provenance store's errors, in a module of their own so that every other one can raise them."""


class ProvenanceError(Exception):
    """A provenance problem the user can act on; the message says what and where."""


class DatabaseLockedError(ProvenanceError):
    """Another process held the database's write lock for longer than the busy timeout."""
