"""How a prompt longer than the embedder's limit is cut: its head, or its head and its tail.

Real prompts put the task's wording at either end (an instruction before a passage, a question
after it); a head-and-tail cut keeps both ends, where a head cut loses a closing question.
"""
from __future__ import annotations

import json
from pathlib import Path

from services.retrieval import TRAINING_INFO_FILE

CUTS = ("head", "head_tail")


def cut_ids(ids: list[int], limit: int, cut: str) -> list[int]:
    """Token ids (with [CLS] first and [SEP] last) cut to at most `limit` ids, [CLS] and [SEP] kept."""
    if len(ids) <= limit:
        return ids
    if cut == "head":
        return ids[:limit - 1] + ids[-1:]
    if cut == "head_tail":
        head = limit // 2
        return ids[:head] + ids[len(ids) - (limit - head):]
    raise ValueError(f"cut must be one of {CUTS}, got {cut!r}")


def folder_cut(model_path: str) -> str:
    """The cut a tuned model was trained with (recorded beside it), else "head" (sentence-transformers' own)."""
    info = Path(model_path) / TRAINING_INFO_FILE
    return json.loads(info.read_text()).get("cut", "head") if info.is_file() else "head"
