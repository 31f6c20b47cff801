"""Tokenize, cut and batch texts for a mean-pooled sentence model; the runtime that runs the
batches (ONNX Runtime: onnx_encoder.py, PyTorch bfloat16: bf16_encoder.py) is the subclass's.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

from services.retrieval.cut import cut_ids

INPUTS = ("input_ids", "attention_mask", "token_type_ids")
PAD_SLACK = 0.2  # largest share of a group's tokens that may be padding


class BatchEncoder:
    """Texts -> (n, dim) float32 unit rows: tokenized (cut to max_seq_length), run in groups of
    similar token counts (`length_groups`), each group padded to a multiple of `width_multiple`."""

    pad_slack: float = PAD_SLACK  # 1.0: the whole batch in one run, padded to its longest
    width_multiple: int = 1

    def __init__(self, tokenizer_file: Path, max_seq_length: int, cut: str = "head"):
        from tokenizers import Tokenizer

        self.tokenizer = Tokenizer.from_file(str(tokenizer_file))
        self.tokenizer.no_truncation()  # cut_ids cuts, so that the tail can be kept
        self.tokenizer.no_padding()
        self.max_seq_length, self.cut = max_seq_length, cut

    def _run(self, feed: dict[str, np.ndarray]) -> np.ndarray:
        """Model inputs (group, tokens) each -> (group, dim) float32 unit rows."""
        raise NotImplementedError

    def encode(self, texts: list[str]) -> np.ndarray:
        """(n, dim) float32 for one batch."""
        ids = [cut_ids(e.ids, self.max_seq_length, self.cut) for e in self.tokenizer.encode_batch(texts)]
        out = None
        for rows in length_groups([len(row) for row in ids], self.pad_slack):
            width = min(-(-len(ids[rows[0]]) // self.width_multiple) * self.width_multiple, self.max_seq_length)
            vectors = self._run(padded_batch([ids[i] for i in rows], width))  # (group, dim)
            if out is None:
                out = np.empty((len(ids), vectors.shape[1]), dtype=np.float32)  # (n, dim)
            out[rows] = vectors
        return out


def length_groups(lengths: list[int], slack: float = PAD_SLACK) -> list[list[int]]:
    """Indices grouped longest first so that each group's padding is at most `slack` of its longest
    row: a member is at least (1 - slack) x the group's longest. A batch of real prompts (50-300
    words) padded to its longest ran 2.3x the CPU of the same prompts one by one (docs/retrieval.md);
    one more run of the model costs far less than the padding it saves."""
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
    groups: list[list[int]] = []
    for i in order:
        if groups and lengths[i] >= (1.0 - slack) * lengths[groups[-1][0]]:
            groups[-1].append(i)
        else:
            groups.append([i])
    return groups


def padded_batch(ids: list[list[int]], width: int = 0) -> dict[str, np.ndarray]:
    """Model inputs (n, tokens) int64 each, padded to the longest (or to `width` if longer); pad id 0
    and mask 0 add nothing to the mean.

    Single-segment texts: token_type_ids are all 0.
    """
    width = max(width, max(len(row) for row in ids))
    feed = {name: np.zeros((len(ids), width), dtype=np.int64) for name in INPUTS}  # (n, tokens) each
    for row, row_ids in enumerate(ids):
        feed["input_ids"][row, :len(row_ids)] = row_ids
        feed["attention_mask"][row, :len(row_ids)] = 1
    return feed
