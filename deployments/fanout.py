"""The Ingress's calls to the retriever and composer groups, made on behalf of one HTTP request.

Ray Serve 2.60 gives every handle call the internal request id of the request being
served; its router indexes pending calls by that id and treats a second one as a retry,
so of several concurrent calls (one per prompt) only the first is ever routed. Each
fan-out call therefore runs in a copy of the context with an id of its own."""
from __future__ import annotations

import asyncio
import contextvars
import logging
from typing import AsyncIterator, Awaitable, Callable

from ray.exceptions import RayActorError, RayTaskError
from ray.serve._private.utils import generate_request_id
from ray.serve.context import _set_request_context
from ray.serve.handle import DeploymentHandle

from deployments.http_app import unwrap
from services.errors import Unavailable
from services.serving.composer_service import ComposeJob

log = logging.getLogger("ray.serve")


def call_with_own_id(fn, *args, **kwargs):
    """fn(*args, **kwargs) (a handle's `.remote`) under a fresh internal request id."""

    def run():
        _set_request_context(_internal_request_id=generate_request_id())
        return fn(*args, **kwargs)

    return contextvars.copy_context().run(run)


def replica_lost(err: BaseException) -> bool:
    """The replica serving a call died or became unreachable (not an error of the call itself)."""
    return isinstance(err, RayActorError) or (isinstance(err, RayTaskError) and isinstance(err.cause, RayActorError))


async def next_item(stream):
    """The stream's next item, None at its end, a replica's domain error unwrapped."""
    try:
        return await stream.__anext__()
    except StopAsyncIteration:
        return None
    except RayTaskError as err:
        raise unwrap(err) from None


# A replica lost mid-call (process killed, OOM, node gone) surfaces as RayActorError. Serve's
# router then drops that replica and waits for a live one (Ray restarts the dead one), so a
# call whose output has not reached the client yet is sent again instead of failing the
# request: retrieval and generation have no side effects. Bounded by count here and by
# server.request_timeout_s around every call (the pipeline's).
REPLICA_RETRIES = 3


async def resent_on_replica_loss(what: str, call: Callable[[], Awaitable]):
    """await call(), made again (with backoff) while the replica serving it is lost."""
    for attempt in range(REPLICA_RETRIES + 1):
        try:
            return await call()
        except Exception as err:
            if not replica_lost(err):
                raise
            if attempt >= REPLICA_RETRIES:
                raise Unavailable(f"{what} replica lost and {attempt} retries failed; retry shortly") from err
            log.warning("%s replica lost (%s), sending the call again (retry %d)", what, type(err).__name__,
                        attempt + 1)
            await asyncio.sleep(0.25 * 2 ** attempt)


class ReplicaCalls:
    """The request pipeline's retrieve, compose and stream calls, over the Serve handles."""

    def __init__(self, retriever: DeploymentHandle, composer: DeploymentHandle):
        self.retriever, self.composer = retriever, composer

    async def retrieve(self, text: str, **options) -> dict:
        # a lost retriever replica (and its embedded index): ask another
        return await resent_on_replica_loss(
            "retriever", lambda: call_with_own_id(self.retriever.retrieve.remote, text, **options))

    async def compose(self, job: ComposeJob) -> dict:
        """A non-streamed job's result; the whole job is sent again if its replica is lost midway."""
        async def collect() -> dict:
            stream, result = self._open(job.model_copy(update={"stream": False})), None
            while (item := await next_item(stream)) is not None:
                if isinstance(item, dict):
                    result = item
            return result

        return await resent_on_replica_loss("composer", collect)

    async def stream(self, job: ComposeJob) -> AsyncIterator:
        """Text pieces, then the result dict. Sent again if the replica is lost before the first
        item (nothing reached the client yet); a loss after it ends the stream with an error."""
        async def open_once():
            stream = self._open(job)
            return stream, await next_item(stream)

        stream, item = await resent_on_replica_loss("composer", open_once)
        while item is not None:
            yield item
            try:
                item = await next_item(stream)
            except Exception as err:
                if not replica_lost(err):
                    raise
                raise Unavailable("the composer replica serving this stream was lost; the answer is incomplete, "
                                  "retry the request") from err

    def _open(self, job: ComposeJob):
        return call_with_own_id(self.composer.options(stream=True).generate.remote, job)
