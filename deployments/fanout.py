"""Concurrent handle calls made on behalf of one HTTP request.

Ray Serve 2.60 gives every handle call the internal request id of the request being
served; its router indexes pending calls by that id and treats a second one as a retry,
so of several concurrent calls (one per prompt) only the first is ever routed. Each
fan-out call therefore runs in a copy of the context with an id of its own."""
from __future__ import annotations

import contextvars

from ray.serve._private.utils import generate_request_id
from ray.serve.context import _set_request_context


def call_with_own_id(fn, *args, **kwargs):
    """fn(*args, **kwargs) (a handle's `.remote`) under a fresh internal request id."""

    def run():
        _set_request_context(_internal_request_id=generate_request_id())
        return fn(*args, **kwargs)

    return contextvars.copy_context().run(run)
