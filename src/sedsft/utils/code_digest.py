"""Cache keys on the code that produces a cached thing, not on a hand-bumped version.

A built tiny base and a tokenised toy split are functions of their settings *and* of the
code that generates them: a changed generator with the same settings must not reuse an old
cache entry. ``source_digest`` hashes the source text of the modules that produce an entry,
so any edit to them (a docstring included: cheaper to rebuild once than to judge which edits
matter) gives a new key.
"""

from __future__ import annotations

import hashlib
import inspect
from types import ModuleType


def source_digest(*modules: ModuleType) -> str:
    """A short hash of the source text of ``modules``, in the order given."""
    digest = hashlib.sha256()
    for module in modules:
        digest.update(module.__name__.encode())
        digest.update(inspect.getsource(module).encode())
    return digest.hexdigest()[:16]
