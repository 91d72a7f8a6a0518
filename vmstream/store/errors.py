"""The store's errors, under the project's error tree (vmstream.errors).

    VmstreamError
     +- StoreError              the store failed in a way retrying will not fix (HTTP 500)
         +- ObjectNotFound      a key the caller asked for is not in the backend (exit 3, HTTP 404)
         +- CorruptChunk        stored bytes do not match their blake3 name or do not decode
         +- StoreUnavailable    the backend kept failing after every retry (exit 7, HTTP 503)
         +- InvalidKey          a key with characters or parts the store does not allow (exit 2, HTTP 400)
         +- StoreConflict       a commit raced a garbage collection; store the file again (exit 4, HTTP 409)
     +- BackendUnavailable      one attempt failed in a way that may pass (timeout, 5xx, EIO);
                                the retry policy turns a run of these into StoreUnavailable (exit 7, HTTP 503)

Exit code and HTTP status go together as in vmstream.errors: a 503 is exit 7 (something the
agent needs cannot be reached: retry later), so a client that decodes one of these by its
status alone (it has not imported this module) exits as one that knows the class.

Messages name the backend and the key, so an operator knows where to look.
"""

from __future__ import annotations

from vmstream.errors import Conflict, InvalidInput, NotFound, VmstreamError


class StoreError(VmstreamError):
    """A store failure that retrying will not fix."""

    http_status = 500


class ObjectNotFound(StoreError, NotFound):
    exit_code = 3
    http_status = 404


class InvalidKey(StoreError, InvalidInput):
    exit_code = 2
    http_status = 400


class CorruptChunk(StoreError):
    """Never returned as data: a reader gets this instead of wrong bytes."""


class StoreUnavailable(StoreError):
    exit_code = 7
    http_status = 503


class StoreConflict(StoreError, Conflict):
    exit_code = 4
    http_status = 409


class BackendUnavailable(VmstreamError):
    """One transient failure; raised by backends, consumed by RetryPolicy."""

    exit_code = 7
    http_status = 503
