"""Dataset items and batches that carry their example's position, through any data collator.

R8Trainer attributes each example's loss to its catalog entry by position: the index must ride with the
item from the dataset, past the Trainer's column removal and the user's data collator, into the batch.
A dict item gets it as one more column (`r8_index`), so column removal, which filters dicts only,
still applies; any other item (a `TensorDataset`'s tuple) travels as an `IndexedItem` and reaches the
collator as it was. Nothing here knows about the Trainer.
"""

from __future__ import annotations

from collections.abc import Mapping, MutableMapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch

INDEX_KEY = "r8_index"
BATCH_KEY = "r8_batch"


@dataclass(frozen=True)
class IndexedItem:
    """A dataset item that is not a mapping (a `TensorDataset`'s tuple, a tensor…) with its position."""

    index: int
    item: Any


def _with_index(item: Any, index: int) -> Any:
    # A dict item gets the index as one more column, so the Trainer's column removal (which filters dicts only)
    # still applies to it; any other item passes that removal untouched, as it would without R8.
    if isinstance(item, Mapping):
        return {**item, INDEX_KEY: index}
    return IndexedItem(index, item)


class IndexedDataset(torch.utils.data.Dataset):
    """Each item of `dataset` with its position: a dict item gets `r8_index`, any other becomes an `IndexedItem`.

    When `dataset` fetches several items at once (`__getitems__`, as a `datasets.Dataset` reads one Arrow
    slice for a whole batch), so does this wrapper: torch's DataLoader uses it when the dataset has it.
    """

    def __init__(self, dataset: Any) -> None:
        self.dataset = dataset
        if callable(getattr(dataset, "__getitems__", None)):
            # An instance attribute: the DataLoader's fetcher asks the dataset object, and a wrapped dataset
            # without batched fetch must not seem to have one.
            self.__getitems__ = self._getitems

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int) -> Any:
        return _with_index(self.dataset[index], index)

    def _getitems(self, indices: Sequence[int]) -> list[Any]:
        items = self.dataset.__getitems__(indices)
        return [_with_index(item, index) for item, index in zip(items, indices, strict=True)]


class IndexCarryingCollator:
    """Wraps a data collator so the indices survive it, whatever items it takes and keys it keeps (TRL's drop
    extras): the collator gets the items without them, and the indices are added to the batch it returns, as
    `r8_index` when that batch is a mapping, else beside it (`{r8_batch: batch, r8_index: indices}`, which
    `R8TrainerMixin.training_step` unwraps)."""

    def __init__(self, collator: Any) -> None:
        self.collator = collator

    def __call__(self, features: list[Any]) -> Any:
        if features and isinstance(features[0], IndexedItem):
            indices = [feature.index for feature in features]
            batch = self.collator([feature.item for feature in features])
        elif features and isinstance(features[0], Mapping) and INDEX_KEY in features[0]:
            indices = [feature[INDEX_KEY] for feature in features]
            batch = self.collator([{k: v for k, v in feature.items() if k != INDEX_KEY} for feature in features])
        else:
            return self.collator(features)
        index_tensor = torch.tensor(indices, dtype=torch.long)
        if isinstance(batch, MutableMapping):
            batch[INDEX_KEY] = index_tensor
            return batch
        return {BATCH_KEY: batch, INDEX_KEY: index_tensor}
