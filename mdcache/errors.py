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


class StorageError(UserError):
    """The storage behind a URL cannot be used: unreachable, no credentials, credentials refused."""


_UNREACHABLE = {"EndpointConnectionError", "ConnectTimeoutError", "ClientConnectorError", "ConnectionRefusedError",
                "ReadTimeoutError", "ServerTimeoutError", "ServerDisconnectedError", "ClientOSError"}
_NO_CREDENTIALS = {"NoCredentialsError", "PartialCredentialsError", "CredentialRetrievalError"}
_REFUSED = ("InvalidAccessKeyId", "SignatureDoesNotMatch", "AccessDenied", "Forbidden", "ExpiredToken", "InvalidToken",
            "Access Denied", "does not exist in our records", "signature we calculated does not match")
CREDENTIALS_HINT = ("credentials the standard AWS way (AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY, AWS_PROFILE) or "
                    "--storage-option key=... --storage-option secret=...")


def storage_error(e: BaseException, url: str | None) -> StorageError | None:
    """A storage failure deep inside fsspec/s3fs/botocore, as one line with the URL and what to check;
    None if `e` is something else (which then keeps its traceback)."""
    where = f" ({url})" if url else ""
    chain, seen = [], e
    while seen is not None and len(chain) < 8:
        chain.append(seen)
        seen = seen.__cause__ or seen.__context__
    for x in chain:
        name = type(x).__name__
        if name in _UNREACHABLE:
            return StorageError(f"cannot reach the storage{where}: {x}. Check the endpoint (AWS_ENDPOINT_URL or "
                                "--storage-option endpoint_url=...) and that the server is up")
        if name in _NO_CREDENTIALS:
            return StorageError(f"no credentials for the storage{where}: {x}. Provide {CREDENTIALS_HINT}")
        response = getattr(x, "response", None)  # botocore's ClientError: the error code, whatever the wording
        code = response.get("Error", {}).get("Code", "") if isinstance(response, dict) else ""
        if (isinstance(x, PermissionError) or code) and any(r in f"{code} {x}" for r in _REFUSED):
            return StorageError(f"the storage refused these credentials{where}: {x}. Check {CREDENTIALS_HINT}")
    return None
