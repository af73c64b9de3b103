"""Errors a user can fix, and the one rule for them: one red line naming the file, shard or key, exit 2.

Every such error subclasses UserError; the CLI boundary (`mdcache.commands`) catches UserError and
nothing else, so a programming bug keeps its traceback.
"""
from __future__ import annotations


class UserError(RuntimeError):
    """A failure the user can fix (bad option, missing file, wrong cache). Printed as one line, exit 2."""

    exit_code = 2


class ConfigError(UserError):
    """Options that contradict each other or name something that does not exist."""


class CacheError(UserError):
    """A cache that cannot be used as asked: missing, incomplete, corrupt, or made by something else."""


class CacheNotFound(CacheError):
    """No manifest.json at the URL: not a cache (yet)."""


class SourceError(UserError):
    """A source spec that matches nothing, or a shard that cannot be read. The message names it."""


class TeacherError(UserError):
    """The teacher cannot be built as asked (unknown spec, missing or unsafe weights, unsupported tap)."""
