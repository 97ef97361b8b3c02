"""Where a ``ScoreRequest``'s read points fall in token ids, when the client tokenises the prompt itself.

The prefix is encoded with the model's special start tokens and every segment on its own, then the ids are
concatenated, so each read point falls exactly at a segment end: no BPE merge across a boundary can move it.
The embedded backend, vLLM's ``prompt_logprobs`` scoring and SGLang's ``/generate`` scoring all use this one
layout, which is why their scores line up token for token.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

from nl_rewrite.llm.base import ScoreRequest

Encode = Callable[[str], list[int]]


@dataclass(frozen=True)
class TokenLayout:
    """A request's ids and, per read point, the index of the last token before it (-1: before any token)."""

    ids: tuple[int, ...]
    n_prefix: int
    reads: tuple[int, ...]


def layout(request: ScoreRequest, encode_prefix: Encode, encode_segment: Encode) -> TokenLayout:
    ids = list(encode_prefix(request.prefix))
    n_prefix = len(ids)
    ends = []
    for segment in request.segments:
        ids.extend(encode_segment(segment))
        ends.append(len(ids) - 1)
    return TokenLayout(tuple(ids), n_prefix, tuple(ends[i] for i in request.read_after))
