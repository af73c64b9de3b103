"""`--out` as a local path or any fsspec URL (s3://bucket/runs/pt).

A remote --out is mirrored in a local working directory: existing remote files are pulled first (so
`--resume auto` finds last.ckpt), the trainer writes locally as usual, and `push()` uploads what
changed after every checkpoint. Each file is uploaded whole (one PUT), so a reader of the bucket
sees either the previous or the new version of a checkpoint, never a torn one.
"""
from __future__ import annotations

import hashlib
import os

from mdcache import store


class OutputDir:
    def __init__(self, out: str, storage_options: dict | None = None):
        fs, path = store.url_to_fs(out, storage_options)
        self.url = out
        if store.is_local(fs):
            self.fs, self.remote, self.local = None, None, path
            os.makedirs(path, exist_ok=True)
            return
        self.fs, self.remote = fs, path
        self.local = store.user_cache_dir("outputs", hashlib.sha256(out.encode()).hexdigest()[:16])
        os.makedirs(self.local, exist_ok=True)
        self._pushed: dict[str, tuple[int, float]] = {}
        if fs.exists(path):
            for f in fs.find(path):
                dst = os.path.join(self.local, f[len(path):].lstrip("/"))
                os.makedirs(os.path.dirname(dst), exist_ok=True)
                fs.get_file(f, dst)
                self._pushed[dst] = self._stamp(dst)

    @staticmethod
    def _stamp(p: str) -> tuple[int, float]:
        st = os.stat(p)
        return st.st_size, st.st_mtime

    def push(self) -> list[str]:
        """Upload new or changed files of the local mirror; returns their remote paths."""
        if self.fs is None:
            return []
        sent = []
        for d, _, files in os.walk(self.local):
            for name in files:
                p = os.path.join(d, name)
                if ".tmp" in name or self._pushed.get(p) == self._stamp(p):
                    continue
                dst = store.join(self.remote, os.path.relpath(p, self.local).replace(os.sep, "/"))
                self.fs.put_file(p, dst)
                self._pushed[p] = self._stamp(p)
                sent.append(dst)
        return sent
