"""A character-level MLP language model: next token from a window of previous tokens."""
from __future__ import annotations

from .. import bonds
from ..algebra import Compose
from ._util import check_positive_int
from .mlp import MLP


class CharMLP(Compose):
    """CharMLP(vocab_size, width, depth, ngram=8, manifold="euclidean"): token ids (B, T) ↦ logits
    (B, T, vocab): position t sees the one-hot codes of its last ``ngram`` tokens (NgramOneHot) and
    an MLP of ``depth`` Linear atoms maps them to next-token logits. Same interface as GPT, so the
    training loop serves both."""

    def __init__(self, vocab_size, width, depth, ngram=8, manifold="euclidean"):
        for n, v in (("vocab_size", vocab_size), ("width", width), ("depth", depth), ("ngram", ngram)):
            check_positive_int(n, v, allow_symbolic=False)
        self.vocab_size, self.ngram = vocab_size, ngram
        super().__init__(MLP(vocab_size * ngram, vocab_size, width, depth, manifold=manifold) @
                         bonds.NgramOneHot(vocab_size, ngram))
