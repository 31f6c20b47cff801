"""Train one LoRA adapter with PEFT on a task's examples, and score greedy answers.

Prompts use the base model's chat template, so an adapter sees at training time exactly
what the server builds from a user's message.
"""
from __future__ import annotations

import random
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
from peft import LoraConfig, get_peft_model
from torch.nn import functional as F

from cluster.demo.tasks import Example
from services.evaluation.generation import chat_prompt_ids

LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


@dataclass(frozen=True)
class TrainSettings:
    steps: int = 40
    batch_size: int = 8
    learning_rate: float = 2e-3
    rank: int = 8
    alpha: int = 16
    seed: int = 0


def _left_padded(rows: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)  # (batch, width)
    mask = torch.zeros((len(rows), width), dtype=torch.long)  # (batch, width)
    for i, row in enumerate(rows):
        ids[i, width - len(row):] = torch.tensor(row)
        mask[i, width - len(row):] = 1
    return ids, mask


def _answer_loss(model, tokenizer, batch: list[tuple[list[int], list[int]]]) -> torch.Tensor:
    """Mean cross-entropy over the answer tokens only.

    Rows are left-padded so every answer ends at the last column: the logits of the last
    (longest answer + 1) positions are all the loss needs, which spares the 49k-wide
    output projection on the prompt positions."""
    ids, mask = _left_padded([p + a for p, a in batch], tokenizer.pad_token_id)
    longest = max(len(a) for _, a in batch)
    logits = model(input_ids=ids, attention_mask=mask, logits_to_keep=longest + 1).logits[:, :-1]  # (batch, longest, vocab)
    targets = ids[:, -longest:]  # (batch, longest)
    answer_len = torch.tensor([len(a) for _, a in batch])  # (batch,)
    in_answer = torch.arange(longest).unsqueeze(0) >= (longest - answer_len).unsqueeze(1)  # (batch, longest)
    return F.cross_entropy(logits[in_answer], targets[in_answer])


def encode_examples(tokenizer, examples: list[Example]) -> list[tuple[list[int], list[int]]]:
    """(prompt ids, answer ids ending with the end-of-turn token) per example."""
    end = [tokenizer.eos_token_id]
    return [(chat_prompt_ids(tokenizer, x), tokenizer(y, add_special_tokens=False).input_ids + end) for x, y in examples]


def train_lora(
    model, tokenizer, examples: list[Example], out_dir: Path, settings: TrainSettings,
    on_step: Callable[[float], None] | None = None,
) -> None:
    """Train a fresh LoRA adapter on `model` and save it as a PEFT folder in out_dir.

    The model's weights are left as they were: the LoRA layers are removed again."""
    encoded = encode_examples(tokenizer, examples)
    config = LoraConfig(
        r=settings.rank, lora_alpha=settings.alpha, lora_dropout=0.0,
        target_modules=list(LORA_TARGETS), task_type="CAUSAL_LM",
    )
    torch.manual_seed(settings.seed)
    peft_model = get_peft_model(model, config)
    try:
        peft_model.train()
        params = [p for p in peft_model.parameters() if p.requires_grad]
        optimizer = torch.optim.AdamW(params, lr=settings.learning_rate, weight_decay=0.0)
        schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 1.0 - s / settings.steps)
        rng = random.Random(settings.seed)
        order: list[int] = []
        for _ in range(settings.steps):
            if len(order) < settings.batch_size:
                order += rng.sample(range(len(encoded)), len(encoded))
            batch, order = [encoded[i] for i in order[: settings.batch_size]], order[settings.batch_size:]
            loss = _answer_loss(peft_model, tokenizer, batch)
            loss.backward()
            optimizer.step()
            schedule.step()
            optimizer.zero_grad(set_to_none=True)
            if on_step is not None:
                on_step(loss.item())
        peft_model.eval()
        peft_model.save_pretrained(out_dir, safe_serialization=True)
    finally:
        peft_model.unload()  # the base model's own Linear modules back in place


@torch.no_grad()
def greedy_answers(model, tokenizer, inputs: list[str], max_new_tokens: int, batch_size: int = 16) -> list[str]:
    """Greedy chat answers of `model` (a base model or a PeftModel) to user messages."""
    model.eval()
    answers = []
    for start in range(0, len(inputs), batch_size):
        ids, mask = _left_padded([chat_prompt_ids(tokenizer, x) for x in inputs[start:start + batch_size]], tokenizer.pad_token_id)
        out = model.generate(
            input_ids=ids, attention_mask=mask, max_new_tokens=max_new_tokens, do_sample=False,
            pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id,
        )
        answers += tokenizer.batch_decode(out[:, ids.shape[1]:], skip_special_tokens=True)
    return answers
