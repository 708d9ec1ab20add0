"""Batch collation: one fast-tokenizer batch call per field."""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from rag_lightning.data.readers import QAExample
from rag_lightning.tasks.base import Task, build_task


@dataclass
class Item:
    """A dataset item: an example plus its set's regex flag and name."""

    example: QAExample
    regex: bool = False
    set_name: str = ""


class QACollator:
    """Turns a list of :class:`Item` into the batch dict of the data contract.

    Keys: ``q_input_ids`` (B, Lq) / ``q_attention_mask`` (B, Lq) (query tokenizer, with specials, of
    ``query_prefix + question``, at most ``query_max_length`` (default ``max_question_length``) tokens);
    ``g_question`` list[list[int]] (generator tokenizer, no specials, truncated to max_question_length);
    ``labels`` (B, T) int64 (padding = -100): seq2seq generators, the generator's ``text_target`` encoding of
    the target answer; causal generators (``causal=True``), the answer's tokens as they continue the prompt
    (after a space, no BOS) plus EOS, which the generator learns to emit to stop;
    ``label_positions`` (P,) int64 flat indices into (B, T) of the non-padding labels (computed here, on the
    CPU, so the loss selects them on the device without waiting for it);
    ``questions`` list[str]; ``answers`` list[list[str]]; ``regex`` bool (any item's set is regex);
    plus ``ids`` list[str|None], ``gold_ids`` list[list[str]], ``provenance`` list[list[dict]] (KILT pages),
    ``set_names`` list[str].
    The training target is ``task.target(example)`` (QA: the first gold answer, or a random one when
    ``answer="random"``); the task adds its own keys (``task.collate_extra``, e.g. label choices).
    """

    def __init__(
        self,
        query_tokenizer: Any,
        gen_tokenizer: Any,
        max_question_length: int = 64,
        max_target_length: int = 25,
        answer: str = "first",
        causal: bool = False,
        query_prefix: str = "",
        query_max_length: int | None = None,
        task: Task | None = None,
    ) -> None:
        if answer not in ("first", "random"):
            raise ValueError(f"train_answer must be 'first' or 'random', got {answer!r}")
        self.query_tokenizer, self.gen_tokenizer, self.causal = query_tokenizer, gen_tokenizer, causal
        self.task = build_task(task)
        self.max_question_length, self.max_target_length, self.answer = (
            max_question_length,
            max_target_length,
            answer,
        )
        # the query encoder's conventions (retriever.query_encoder.prefix / max_length): its tokenizer only
        self.query_prefix, self.query_max_length = query_prefix or "", query_max_length

    def __call__(self, items: Sequence[Item]) -> dict[str, Any]:
        exs = [it.example for it in items]
        questions = [e.question for e in exs]
        pick = random.choice if self.answer == "random" else (lambda xs: xs[0])
        targets = [self.task.target(e, pick) for e in exs]
        q = self.query_tokenizer(
            [self.query_prefix + x for x in questions] if self.query_prefix else questions,
            padding=True,
            truncation=True,
            max_length=self.query_max_length or self.max_question_length,
            return_tensors="pt",
        )
        g = self.gen_tokenizer(
            questions, add_special_tokens=False, truncation=True, max_length=self.max_question_length
        )
        labels = self.encode_targets(targets)  # (B, T)
        return {
            "q_input_ids": q["input_ids"],  # (B, Lq)
            "q_attention_mask": q["attention_mask"],  # (B, Lq)
            "g_question": g["input_ids"],
            "labels": labels,
            "label_positions": (labels != -100).flatten().nonzero().squeeze(1),  # (P,)
            "questions": questions,
            "answers": [list(e.answers) for e in exs],
            "regex": any(it.regex for it in items),
            "ids": [e.id for e in exs],
            "gold_ids": [list(e.gold_ids) for e in exs],
            "provenance": [list(e.provenance) for e in exs],
            "set_names": [it.set_name for it in items],
            **self.task.collate_extra(exs, self.encode_targets),
        }

    def encode_targets(self, targets: list[str], max_length: int | None = None) -> torch.Tensor:
        """Target texts -> (N, T) int64 generator labels, padding -100 (seq2seq: ``text_target``; causal:
        :func:`causal_labels`), at most ``max_length`` (default ``max_target_length``) tokens, specials included."""
        max_length = max_length or self.max_target_length
        if self.causal:
            return causal_labels(self.gen_tokenizer, targets, max_length)
        t = self.gen_tokenizer(
            text_target=targets,
            padding=True,
            truncation=True,
            max_length=max_length,
            return_tensors="pt",
        )
        return t["input_ids"].long().masked_fill(t["attention_mask"] == 0, -100)  # (N, T)


def causal_labels(tok: Any, targets: Sequence[str], max_length: int) -> torch.Tensor:
    """Targets of a decoder-only generator: (B, T) int64, each row the answer's tokens as they follow the
    prompt's last word, then EOS (SEP without one), padding -100; at most ``max_length`` tokens with the EOS.

    "As they follow a word": each answer is encoded after a one-word prefix that is then removed, so byte-level
    BPE (GPT-2, Llama 3) sees " Paris" and SentencePiece (Llama 2) "▁Paris", as in running text; no BOS.
    """
    eos = tok.eos_token_id if tok.eos_token_id is not None else tok.sep_token_id
    if eos is None:
        raise ValueError("causal generator targets need a tokenizer with an EOS (or SEP) token")
    head = tok("a", add_special_tokens=False).input_ids
    rows = []
    for t in targets:
        ids = tok("a " + t, add_special_tokens=False).input_ids
        ids = ids[len(head) :] if ids[: len(head)] == head else tok(t, add_special_tokens=False).input_ids
        rows.append(ids[: max_length - 1] + [eos])
    labels = torch.full((len(rows), max(map(len, rows))), -100, dtype=torch.long)
    for i, r in enumerate(rows):
        labels[i, : len(r)] = torch.tensor(r)
    return labels
