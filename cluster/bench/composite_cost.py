"""Materialization cost of a composite adapter: three random rank-8 adapters on all seven projections
of SmolLM2-135M's 30 layers, mixed (rank 24) and fused (rank 8), built and written into a fresh
CompositeCache, 3 times each.  python -m cluster.bench.composite_cost"""
import time, tempfile, torch
from pathlib import Path
from services.composition import Composition
from services.lora.adapter_files import LoraAdapterWeights
from services.lora.composite import CompositeCache
torch.set_num_threads(2)
shapes = {"q_proj": (576, 576), "k_proj": (576, 192), "v_proj": (576, 192), "o_proj": (576, 576),
          "gate_proj": (576, 1536), "up_proj": (576, 1536), "down_proj": (1536, 576)}
block = {m: ("self_attn" if m in ("q_proj","k_proj","v_proj","o_proj") else "mlp") for m in shapes}
def adapter(name, r=8):
    a = {f"model.layers.{i}.{block[m]}.{m}": torch.randn(r, i_) for i in range(30) for m, (i_, o) in shapes.items()}
    b = {f"model.layers.{i}.{block[m]}.{m}": torch.randn(o, r) for i in range(30) for m, (i_, o) in shapes.items()}
    return LoraAdapterWeights(name, r, 2.0, tuple(shapes), None, a, b)
ws = {k: adapter(k) for k in ("a@1", "b@1", "c@1")}
for mode in ("mixture", "fusion"):
    times = []
    for trial in range(3):
        cache = CompositeCache(Path(tempfile.mkdtemp()), 1 << 34)
        t = time.perf_counter(); name, path = cache.acquire(Composition.of(mode, list(ws)), ws.__getitem__); times.append(time.perf_counter() - t)
    size = sum(f.stat().st_size for f in path.iterdir())
    print(mode, "build+write s", [round(x, 3) for x in times], "MB", round(size / 2**20, 1))
