"""One base model serving many LoRA adapters, each batch row with its own composition."""
from __future__ import annotations

import logging
import threading
from contextlib import contextmanager
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from services.lora.adapter_files import LoraAdapterWeights, check_adapter_name, read_adapter
from services.composition import Composition, CompositionError
from services.lora.batch_meta import build_batch_meta
from services.lora.decoder import SlotDecoder
from services.lora.generation import GenerationRequest, GenerationResult, check_request
from services.lora.layers import LoraContext, linear_shapes, wrap_model
from services.lora.pool import AdapterPool
from services.lora.packed_linear import can_pack, pack_linears
from services.lora.prefix_cache import PrefixCache
from services.lora.scheduler import DecodeScheduler, run_batch

log = logging.getLogger(__name__)


def native_bfloat16(device: torch.device) -> torch.dtype:
    """bfloat16 where the device has bfloat16 arithmetic (a CPU with AVX-512 BF16 or AMX; CUDA's own
    check), else float32: elsewhere bfloat16 is emulated and slower than float32."""
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float32
    native = torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported()
    return torch.bfloat16 if native and can_pack(device, torch.bfloat16) else torch.float32


class CompositionEngine:
    own_grammars = True  # response_format becomes a token constraint built by the composer (llguidance)
    scores_compatibility = True  # forward_logits serves services/lora/compatibility.py

    def __init__(self, model, tokenizer, *, max_adapters_per_row: int = 4, device_slots: int = 32,
                 cpu_slots: int = 128, max_rank: int = 64, allow_unsafe_pickle: bool = False,
                 base_model: str | None = None, max_batch_rows: int = 64, prefill_tokens: int = 512,
                 prefix_cache_mb: int = 256, pack_weights: bool = True):
        self.model, self.tokenizer = model.eval(), tokenizer
        self.max_batch_rows, self.prefill_tokens = max_batch_rows, prefill_tokens
        self.decoder = SlotDecoder(model)
        self._parked_cache = None  # the last finished scheduler's KV cache: the next one starts with it
        self.prefix_cache = PrefixCache(prefix_cache_mb * 2**20)
        self.max_adapters_per_row, self.max_rank = max_adapters_per_row, max_rank
        self.allow_unsafe_pickle, self.base_model = allow_unsafe_pickle, base_model
        param = next(model.parameters())
        self.device, self.dtype = param.device, param.dtype
        # On CPU the LoRA stacks and their products are float32 under any model dtype: bfloat16 took
        # 2-3x as long at 4 rows and 1.3-1.8x at 16, the small batches where a step's latency is felt
        # (float32 costs up to 1.4x at 64 rows); `decode_ops --only "lora delta"`.
        self.lora_dtype = torch.float32 if self.device.type == "cpu" else self.dtype
        self.pool = AdapterPool(linear_shapes(model), device=self.device, dtype=self.lora_dtype,
                                device_slots=device_slots, cpu_slots=cpu_slots, reload=self.read)
        self.context = LoraContext(self.pool)
        # One driver at a time writes device slots and runs forwards: a slot write may re-pad every
        # stack (a larger rank), which must not happen under a forward in flight.
        self.device_lock = threading.RLock()
        wrap_model(model, self.context)
        if pack_weights and can_pack(self.device, self.dtype):
            pack_linears(model, batch_hint=max_batch_rows)
        eos = model.generation_config.eos_token_id if model.generation_config is not None else None
        eos = eos if eos is not None else tokenizer.eos_token_id
        self.eos_ids = set(eos) if isinstance(eos, (list, tuple)) else ({eos} if eos is not None else set())
        pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        self.pad_id = pad if pad is not None else 0

    @classmethod
    def from_pretrained(cls, path, *, device="auto", dtype="float32", **kw) -> "CompositionEngine":
        """A Hugging Face folder (or a .gguf file, dequantized) and its tokenizer; dtype "auto" is
        bfloat16 where the device computes it natively, else float32."""
        path = Path(path)
        if device == "auto":
            device = "cuda" if torch.cuda.is_available() else "cpu"
        torch_dtype = native_bfloat16(torch.device(device)) if dtype == "auto" else getattr(torch, dtype)
        gguf = {"gguf_file": path.name} if path.suffix == ".gguf" else {}
        folder = path.parent if gguf else path
        model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch_dtype, **gguf).to(device)
        return cls(model, AutoTokenizer.from_pretrained(folder, **gguf), **kw)

    # -- adapters ---------------------------------------------------------
    def read(self, key: str, path) -> LoraAdapterWeights:
        return read_adapter(path, base_config=self.model.config, base_model=self.base_model, max_rank=self.max_rank,
                            allow_unsafe_pickle=self.allow_unsafe_pickle, name=key.partition("@")[0])

    def load_adapter(self, key: str, path) -> LoraAdapterWeights:
        """Validate the folder and put the adapter in the CPU tier; a refused one changes nothing."""
        check_adapter_name(key)
        return self.install_adapter(key, self.read(key, path), path)

    def install_adapter(self, key: str, weights: LoraAdapterWeights, path) -> LoraAdapterWeights:
        """Put weights `read` from `path` in the CPU tier (the read may run on another thread; this
        must not overlap a forward)."""
        check_adapter_name(key)
        replaced = self.pool.contains(key)
        self.pool.add(key, weights, Path(path))
        if replaced:  # cached prefixes under this key were read with the old weights
            self.prefix_cache.clear()
        return weights

    def unload_adapter(self, key: str) -> None:
        self.pool.remove(key)
        self.prefix_cache.clear()  # the key may come back with other weights

    def ensure_in_memory(self, key: str) -> None:
        """See AdapterPool.ensure_in_memory."""
        self.pool.ensure_in_memory(key)

    def has_adapter(self, key: str) -> bool:
        return self.pool.contains(key)

    def pin(self, key: str) -> None:
        with self.device_lock:
            self.pool.pin(key)

    def unpin(self, key: str) -> None:
        self.pool.unpin(key)

    def loaded_adapters(self) -> list[str]:
        """Every adapter the pool knows (device, CPU tier or re-readable from its folder)."""
        return list(self.pool.paths)

    def adapters_in_use(self) -> set[str]:
        """Adapters that running rows hold (they cannot be unloaded now)."""
        with self.pool.lock:
            return set(self.pool.in_use)

    def resident_adapters(self) -> list[str]:
        """Adapters on the model's device now."""
        return self.pool.resident()

    def pool_stats(self) -> dict:
        """The adapter pool's counters, plus the prefix cache's (prefix_hit_tokens, prefix_miss_tokens)."""
        return {**self.pool.stats(), **{f"prefix_{k}": v for k, v in self.prefix_cache.counters.items()}}

    # -- forward ----------------------------------------------------------
    @contextmanager
    def composed(self, rows: list[Composition]):
        """Acquire the rows' adapters on the device and install the batch metadata for the forwards
        inside; the adapters cannot be evicted until the block ends."""
        for row in rows:
            if len(row.adapters) > self.max_adapters_per_row:
                raise CompositionError(f"a row uses {len(row.adapters)} adapters; the limit is {self.max_adapters_per_row}")
        keys = [key for row in rows for key in row.adapters]
        with self.device_lock:
            slot_of = self.pool.acquire(keys)
            try:
                self.context.meta = build_batch_meta(rows, slot_of, dtype=self.lora_dtype, device=self.device)
                yield
            finally:
                self.context.meta = None
                self.pool.release(keys)

    @torch.inference_mode()
    def forward_logits(self, input_ids, attention_mask, rows: list[Composition], keep: int = 0) -> torch.Tensor:
        """Logits (batch, seq, vocab) of one forward with each row composed as given (no cache);
        keep > 0: only the last `keep` positions' (batch, keep, vocab), sparing the output projection
        of the others."""
        input_ids, attention_mask = input_ids.to(self.device), attention_mask.to(self.device)
        with self.composed(rows):
            position_ids = (attention_mask.cumsum(-1) - 1).clamp(min=0)
            return self.model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                              use_cache=False, logits_to_keep=keep).logits

    def take_cache(self):
        """A KV SlotCache: the parked one (already grown, already zeroed: its stale keys are finite
        and never read unmasked), else a small new one."""
        cache, self._parked_cache = self._parked_cache, None
        return cache if cache is not None else self.decoder.new_cache()

    def park_cache(self, cache) -> None:
        self._parked_cache = cache

    def scheduler(self) -> DecodeScheduler:
        """A continuous batch over this engine (one driver thread; see services/lora/scheduler.py)."""
        return DecodeScheduler(self, max_rows=self.max_batch_rows, prefill_tokens=self.prefill_tokens)

    def generate(self, requests: list[GenerationRequest]) -> list[GenerationResult]:
        """A heterogeneous batch: every row its own adapters, mode and sampling, run as one
        continuous batch: rows join as others leave, when a row slot and device slots for their
        adapters are free (a mix wider than the device slots runs in turns, never refused; a row
        that alone needs more adapters than the slots is refused with the pool's reason)."""
        return run_batch(self, requests)

    def check(self, request: GenerationRequest) -> None:
        """Refuse a request this engine cannot run, before it joins a batch."""
        check_request(request, self.vocab_size)

    @property
    def vocab_size(self) -> int:
        return self.model.get_output_embeddings().out_features

    def project(self, hidden: torch.Tensor) -> torch.Tensor:
        """Logits of final hidden states (the LM head; adapters never target it)."""
        return self.model.get_output_embeddings()(hidden)
