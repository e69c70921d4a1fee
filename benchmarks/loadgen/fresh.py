"""Fresh prompts: every request a prompt never sent before, shaped like the prompt set's.

A server can be fast on a repeating set for reasons real traffic does not give it: per-length caches
(the DiT's CUDA graphs are captured per caption length) or anything keyed by the prompt. In this mode
each request draws a prompt of the set and replaces each of its words (and each CJK character, since
those scripts have no spaces) with one drawn from all the set's words (characters) of that kind, so
the new prompt has the drawn one's length in words and its script, and the lengths follow the set's
distribution; common words are drawn as often as they occur. A prompt already sent in the run, or one
of the set, is drawn again. Deterministic: request i's prompt depends only on the seed, i and the
prompts before it, and loadgen builds requests in index order.
"""

from __future__ import annotations

import random
import re

# One CJK ideograph, kana or fullwidth sign is a unit of its own; any other run without spaces is a word.
_CJK = "\u3000-\u30ff\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff\uff00-\uffef"
_UNIT = re.compile(f"[{_CJK}]|[^\\s{_CJK}]+")
_IS_CJK = re.compile(f"[{_CJK}]")
MAX_DRAWS = 1000


def units(prompt: str) -> list[str]:
    """A prompt's words and CJK characters, in order."""
    return _UNIT.findall(prompt)


def is_cjk(unit: str) -> bool:
    return bool(_IS_CJK.fullmatch(unit))


def join_units(parts: list[str]) -> str:
    """Words are joined by a space; CJK characters touch each other and their neighbours."""
    text = ""
    for i, unit in enumerate(parts):
        if i and not (is_cjk(unit) or is_cjk(parts[i - 1])):
            text += " "
        text += unit
    return text


class FreshPrompts:
    """`prompt(index)` gives request `index` a prompt never given before (nor one of the set)."""

    def __init__(self, prompts: list[str], seed: int = 0):
        if not prompts:
            raise ValueError("fresh prompts need a non-empty prompt set")
        self.shapes = [units(p) for p in prompts]
        self.shapes = [shape for shape in self.shapes if shape]
        if not self.shapes:
            raise ValueError("the prompt set has no words")
        every = [unit for shape in self.shapes for unit in shape]
        self.pool = {True: [u for u in every if is_cjk(u)], False: [u for u in every if not is_cjk(u)]}
        self.seed = seed
        self.sent: set[str] = set(prompts)

    def prompt(self, index: int) -> str:
        rng = random.Random(f"fresh:{self.seed}:{index}")
        for _ in range(MAX_DRAWS):
            shape = self.shapes[rng.randrange(len(self.shapes))]
            text = join_units([rng.choice(self.pool[is_cjk(unit)]) for unit in shape])
            if text not in self.sent:
                self.sent.add(text)
                return text
        raise ValueError(f"no fresh prompt in {MAX_DRAWS} draws: the prompt set has too few words")
