"""Redis plumbing shared by the registry and placement: error translation and a bytes client."""
from __future__ import annotations

from contextlib import contextmanager

import redis

from services.registry.errors import RegistryUnavailable


def describe(client: redis.Redis) -> str:
    kwargs = client.connection_pool.connection_kwargs
    if "path" in kwargs:
        return f"unix:{kwargs['path']}"
    return f"{kwargs.get('host', '?')}:{kwargs.get('port', '?')}"


@contextmanager
def guarded(client: redis.Redis, action: str):
    """Turn Redis failures (down, timeout, read-only, out of memory) into RegistryUnavailable."""
    try:
        yield
    except redis.WatchError:
        raise
    except redis.RedisError as err:
        raise RegistryUnavailable(
            f"cannot {action}: Redis at {describe(client)} is unavailable ({type(err).__name__}: {err})"
        ) from err


def bytes_client(client: redis.Redis) -> redis.Redis:
    """A client on the same server that returns bytes (embeddings are raw float32)."""
    pool = client.connection_pool
    if not pool.connection_kwargs.get("decode_responses"):
        return client
    kwargs = {**pool.connection_kwargs, "decode_responses": False}
    return redis.Redis(connection_pool=redis.ConnectionPool(connection_class=pool.connection_class, **kwargs))
