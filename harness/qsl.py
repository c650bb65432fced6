"""LoadGen's query sample library over a :class:`sdxl.dataset.CaptionSet`.

Tokenization happens in ``LoadSamplesToRam`` (outside the timed region), as the reference
pre-tokenizes; ``get`` then only gathers token-id rows for a batch.
"""

from __future__ import annotations

import threading

import torch

from sdxl.benchmark_spec import PERFORMANCE_SAMPLE_COUNT
from sdxl.dataset import CaptionSet
from sdxl.tokenizers import tokenize


class CaptionQSL:
    """Token ids of both SDXL tokenizers for the loaded ``qsl_idx`` set."""

    def __init__(self, captions: CaptionSet, tokenizers: tuple):
        self.captions = captions
        self.tokenizers = tokenizers
        self._ids: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
        self._lock = threading.Lock()

    @property
    def total_count(self) -> int:
        return len(self.captions)

    @property
    def performance_count(self) -> int:
        """MLPerf's 5000, or the whole set when it is smaller."""
        return min(PERFORMANCE_SAMPLE_COUNT, self.total_count)

    def load(self, indices: list[int]) -> None:
        texts = [self.captions.captions[i] for i in indices]
        ids_1, ids_2 = (tokenize(tok, texts) for tok in self.tokenizers)
        with self._lock:
            for row, index in enumerate(indices):
                self._ids[index] = (ids_1[row], ids_2[row])

    def unload(self, indices: list[int]) -> None:
        with self._lock:
            for index in indices:
                self._ids.pop(index, None)

    def get(self, indices: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
        """Stacked ``(N, 77)`` ids of tokenizer 1 and 2 for ``indices`` (which must be loaded)."""
        try:
            rows = [self._ids[i] for i in indices]
        except KeyError as exc:
            raise RuntimeError(f"qsl_idx {exc.args[0]} was issued but not loaded by LoadGen") from None
        return torch.stack([r[0] for r in rows]), torch.stack([r[1] for r in rows])

    def construct(self):
        import mlperf_loadgen as lg

        return lg.ConstructQSL(self.total_count, self.performance_count, self.load, self.unload)
