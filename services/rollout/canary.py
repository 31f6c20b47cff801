"""Automatic canary verdicts: count each answered request of an adapter under an automatic
canary, per arm (active or canary version), in Redis, and judge once the canary arm has
enough requests (docs/rollout.md states the rule).

The Ingress that records a request also judges it, so there is no extra process: a Redis
lock lets one replica write the verdict, and the registry writes it only while that
canary is still running. 4xx answers say nothing about the version and are not counted;
5xx answers are errors; latency is compared on successful answers, in log seconds."""
from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from typing import Callable, Iterable

from services.registry.redis_access import guarded

log = logging.getLogger(__name__)

STATS_TTL_S = 7 * 86400  # counters of a canary nobody judges (e.g. cleared by hand) expire
LOCK_TTL_S = 30
ARMS = ("active", "canary")


def stats_key(name: str, version: str) -> str:
    return f"lr:rollout:canary:{name}:{version}"  # hash: '<arm>:<field>' -> number


def lock_key(name: str, version: str) -> str:
    return f"lr:rollout:verdict-lock:{name}:{version}"


@dataclass
class Arm:
    """One arm's counts: answered requests, 5xx errors, and ln(seconds) sums of the successes."""

    requests: int = 0
    errors: int = 0
    log_sum: float = 0.0
    log_sq: float = 0.0

    @property
    def ok(self) -> int:
        return self.requests - self.errors

    @property
    def error_rate(self) -> float:
        return self.errors / self.requests if self.requests else 0.0

    def log_mean(self) -> float:
        return self.log_sum / self.ok

    def log_var(self) -> float:
        """Sample variance of ln(seconds) (n - 1 in the denominator)."""
        return max(0.0, (self.log_sq - self.log_sum ** 2 / self.ok) / (self.ok - 1))


def read_arms(raw: dict) -> dict[str, Arm]:
    """The hash of stats_key -> {'active': Arm, 'canary': Arm}."""
    fields = {(k.decode() if isinstance(k, bytes) else k): float(v) for k, v in raw.items()}
    return {arm: Arm(requests=int(fields.get(f"{arm}:requests", 0)), errors=int(fields.get(f"{arm}:errors", 0)),
                     log_sum=fields.get(f"{arm}:log_sum", 0.0), log_sq=fields.get(f"{arm}:log_sq", 0.0))
            for arm in ARMS}


def binomial_tail(k: int, n: int, p: float) -> float:
    """P(X >= k) for X ~ Binomial(n, p), summed in log space (exact, no overflow)."""
    if k <= 0:
        return 1.0
    if p <= 0.0:
        return 0.0
    if p >= 1.0:
        return 1.0
    terms = [math.lgamma(n + 1) - math.lgamma(i + 1) - math.lgamma(n - i + 1) + i * math.log(p)
             + (n - i) * math.log1p(-p) for i in range(k, n + 1)]
    top = max(terms)
    return min(1.0, math.exp(top) * sum(math.exp(t - top) for t in terms))


def latency_excess_p(canary: Arm, active: Arm, tolerance: float) -> float:
    """One-sided Welch test, normal approximation: the p-value of 'the canary's mean ln(latency)
    exceeds the active's by more than ln(1 + tolerance)'. Small p: the canary is slower."""
    se = math.sqrt(canary.log_var() / canary.ok + active.log_var() / active.ok)
    excess = canary.log_mean() - active.log_mean() - math.log1p(tolerance)
    if se == 0.0:
        return 0.0 if excess > 0 else 1.0
    return 0.5 * math.erfc(excess / se / math.sqrt(2))


@dataclass(frozen=True)
class Verdict:
    promote: bool
    reason: str


def decide(active: Arm, canary: Arm, *, min_requests: int, alpha: float, error_floor: float,
           latency_tolerance: float) -> Verdict | None:
    """The verdict on the counts so far, or None to keep going.

    Errors: one-sided exact binomial test of the canary's errors against the active version's
    error rate (at least `error_floor`). Before `min_requests` canary requests it runs at
    alpha / min_requests after every outcome (Bonferroni over the looks), so a broken version
    is stopped within a few requests; at `min_requests` the errors are tested at alpha, then
    latency (latency_excess_p) at alpha. Either test rejecting rolls back; else promote."""
    if canary.requests == 0:
        return None
    base_rate = max(error_floor, active.error_rate)
    final = canary.requests >= min_requests
    level = alpha if final else alpha / min_requests
    p_errors = binomial_tail(canary.errors, canary.requests, base_rate)
    errors = (f"errors {canary.errors}/{canary.requests} ({canary.error_rate:.1%}) vs active "
              f"{active.errors}/{active.requests} ({active.error_rate:.1%}), p={p_errors:.2g}")
    if p_errors < level:
        return Verdict(False, f"{errors} < {level:.2g}")
    if not final:
        return None
    if canary.ok < 2 or active.ok < 2:
        return Verdict(True, f"{errors}; latency not compared (fewer than 2 answers in an arm)")
    p_latency = latency_excess_p(canary, active, latency_tolerance)
    ratio = math.exp(canary.log_mean() - active.log_mean())
    latency = (f"latency geometric mean x{ratio:.2f} of active's (tolerance x{1 + latency_tolerance:.2f}), "
               f"p={p_latency:.2g}")
    if p_latency < alpha:
        return Verdict(False, f"{latency} < {alpha:g}; {errors}")
    return Verdict(True, f"{errors}; {latency}")


def reset(redis_client, name: str, version: str) -> None:
    """Fresh counters for a canary that starts now (RegistryUnavailable if Redis is away)."""
    with guarded(redis_client, f"reset the canary counters of {name}@{version}"):
        redis_client.delete(stats_key(name, version), lock_key(name, version))


def progress(redis_client, name: str, version: str) -> dict[str, Arm]:
    with guarded(redis_client, f"read the canary counters of {name}@{version}"):
        return read_arms(redis_client.hgetall(stats_key(name, version)))


class CanaryJudge:
    """Records request outcomes of adapters under an automatic canary and applies verdicts."""

    def __init__(self, registry, rollout_cfg, on_promote: Callable[[str], None] | None = None):
        """on_promote(name) is called after a verdict promoted name's canary (compatibility scores
        follow the new active version, as after an operator's promote)."""
        from services.serving.catalog import CatalogCache

        self.registry = registry  # its Redis client holds the counters too
        self.cfg = rollout_cfg
        self.on_promote = on_promote
        self.catalog = CatalogCache(registry)  # which adapters are under a canary, refreshed as serving's is

    def observe(self, plans: Iterable, status: int, seconds: float) -> list[str]:
        """Count one answered request (its plans' adapter versions, HTTP status, wall time);
        returns the verdicts written now ('name@version promoted: ...'). Never raises: counting
        must not fail a request."""
        if 400 <= status < 500:
            return []
        catalog, written = self.catalog.get(), []
        for name, version in {(a.name, a.version) for plan in plans for a in plan.adapters}:
            rec = catalog.records.get(name)
            canary = rec.canary if rec is not None else None
            if canary is None or not canary.auto:
                continue
            arm = "canary" if version == canary.version else "active" if version == rec.active_version else None
            if arm is None:
                continue
            try:
                verdict = self._record(name, canary, arm, status >= 500, seconds)
            except Exception as err:  # Redis away: the canary waits, serving goes on
                log.warning("canary counters of %s not updated: %s", name, err)
                continue
            if verdict is not None:
                written.append(verdict)
        return written

    def _record(self, name: str, canary, arm: str, error: bool, seconds: float) -> str | None:
        r, key = self.registry.r, stats_key(name, canary.version)
        pipe = r.pipeline(transaction=True)
        pipe.hincrby(key, f"{arm}:requests", 1)
        if error:
            pipe.hincrby(key, f"{arm}:errors", 1)
        else:
            log_s = math.log(max(seconds, 1e-6))
            pipe.hincrbyfloat(key, f"{arm}:log_sum", log_s)
            pipe.hincrbyfloat(key, f"{arm}:log_sq", log_s * log_s)
        pipe.expire(key, STATS_TTL_S)
        pipe.hgetall(key)
        arms = read_arms(pipe.execute()[-1])
        if arm != "canary":
            return None
        min_requests = canary.min_requests or self.cfg.canary_min_requests
        verdict = decide(arms["active"], arms["canary"], min_requests=min_requests, alpha=self.cfg.canary_alpha,
                         error_floor=self.cfg.canary_error_floor, latency_tolerance=self.cfg.canary_latency_tolerance)
        if verdict is None or not r.set(lock_key(name, canary.version), "1", nx=True, ex=LOCK_TTL_S):
            return None
        if self.registry.finish_canary(name, canary.version, verdict.promote, verdict.reason) is None:
            return None
        outcome = f"{name}@{canary.version} {'promoted' if verdict.promote else 'rolled back'}: {verdict.reason}"
        log.info("canary verdict: %s", outcome)
        if verdict.promote and self.on_promote is not None:
            self.on_promote(name)
        return outcome
