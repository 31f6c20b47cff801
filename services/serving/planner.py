"""Turn a request's `model` and `lora` options plus retrieval results into a composition plan.

Plain functions: the ingress deployment calls them, the tests call them without Ray.
"""
from __future__ import annotations

from dataclasses import dataclass

from services.composition import AdapterKey, Composition, CompositionMode, Weighting, composition_weights
from services.schemas import CompositionPlan, LoraOptions, RetrievalResult, UsedAdapter
from services.serving.catalog import Catalog
from services.serving.policy import AUTO, PolicyThresholds, decide

AUTO_MODEL = "auto"


@dataclass(frozen=True)
class PlanDefaults:
    """Server-side defaults a request's `lora` object overrides."""

    top_k: int
    composition: CompositionMode | str  # a mode, or AUTO (the policy)
    weighting: Weighting
    temperature: float
    min_similarity: float


def needs_retrieval(model: str, opts: LoraOptions) -> bool:
    return model == AUTO_MODEL and opts.adapters is None and opts.composition is not CompositionMode.none


def plan_composition(
    *,
    model: str,
    base_model_id: str,
    opts: LoraOptions,
    defaults: PlanDefaults,
    catalog: Catalog,
    tenant: str | None,
    request_id: str,
    retrieved: RetrievalResult | None = None,
    compat=None,
) -> CompositionPlan:
    """The adapters (resolved to versions), weights and mode for one prompt.

    Raises catalog.AdapterUnavailable for an adapter the caller may not use, CompositionError for
    adapters that cannot be composed (one named twice). compat: the compatibility snapshot
    (services/registry/compatibility.py) the auto policy reads; None = no scores, defaults."""
    mode = opts.composition or defaults.composition
    if mode == AUTO:
        if model == AUTO_MODEL and opts.adapters is None:
            return plan_auto(retrieved, opts, defaults, catalog, tenant, request_id, compat)
        mode = CompositionMode.mixture  # named adapters: nothing to decide, mix them as asked
    if mode is CompositionMode.none or (model == base_model_id and opts.adapters is None):
        return CompositionPlan()

    if opts.adapters is not None:
        refs, scores = list(opts.adapters), [None] * len(opts.adapters)
    elif model == AUTO_MODEL:
        assert retrieved is not None, "auto needs retrieval results"
        hits = [a for a in retrieved.adapters if catalog.is_visible(a.name, tenant)]
        refs, scores = [a.name for a in hits], [a.score for a in hits]
    else:
        refs, scores, mode = [model], [None], CompositionMode.selection

    weighting = opts.weighting or defaults.weighting
    if any(s is None for s in scores):
        weighting = Weighting.uniform  # explicitly named adapters have no scores to soften
    weights = composition_weights([s or 0.0 for s in scores], weighting, opts.temperature or defaults.temperature)
    composition = Composition.of(mode, refs, weights)  # the mode's rule: selection keeps the top-1 at 1
    resolved = [catalog.resolve(ref, tenant=tenant, request_id=request_id) for ref in composition.adapters]
    return CompositionPlan(
        adapters=[UsedAdapter(name=name, version=version, weight=w, score=s)
                  for (name, version), w, s in zip(resolved, composition.weights, scores)],
        composition=composition.mode,
    )


def plan_auto(retrieved: RetrievalResult, opts: LoraOptions, defaults: PlanDefaults, catalog: Catalog,
              tenant: str | None, request_id: str, compat) -> CompositionPlan:
    """The auto policy over the retrieved adapters the caller may use, each resolved to the version
    this request gets (canary or active), so gain tables are read for those versions."""
    hits = [a for a in retrieved.adapters if catalog.is_visible(a.name, tenant)]
    versions = {a.name: catalog.resolve(a.name, tenant=tenant, request_id=request_id)[1] for a in hits}
    keys = {a.name: str(AdapterKey(a.name, versions[a.name])) for a in hits}
    thresholds = compat.thresholds if compat is not None else PolicyThresholds()
    min_similarity = opts.min_similarity if opts.min_similarity is not None else defaults.min_similarity
    decision = decide([(a.name, a.score) for a in hits],
                      lambda name: compat.table(keys[name]) if compat is not None else None,
                      thresholds, min_similarity)
    scores = {a.name: a.score for a in hits}
    return CompositionPlan(
        adapters=[UsedAdapter(name=n, version=versions[n], weight=w, score=scores[n])
                  for n, w in zip(decision.adapters, decision.weights)],
        composition=decision.mode, decision=decision.explain())
