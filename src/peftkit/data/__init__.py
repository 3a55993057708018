"""From a data file to tokenized training examples.

    cfg = DataConfig(train="builtin:tweet-sentiment", test_size=500, max_train_examples=2000)
    data = build_datasets(cfg, tokenizer, seed=0)
    print(data.summary())
    data.train[0].input_ids, data.train[0].labels      # labels are -100 outside the answer

Modules: :mod:`.config` (the ``data:`` section), :mod:`.readers` (files -> rows),
:mod:`.formats` (rows -> samples), :mod:`.chat` (chat-template spans), :mod:`.encode`
(samples -> examples), :mod:`.splits` (test / validation / train), :mod:`.builtin` (named data sets).
"""

from __future__ import annotations

from peftkit.data.builtin import BUILTINS, BuiltinDataset, register_builtin
from peftkit.data.config import FORMAT_FIELDS, DataConfig
from peftkit.data.encode import IGNORE_INDEX, Encoder, Example
from peftkit.data.formats import Sample, detect_format
from peftkit.data.readers import READERS, Record, read_file, read_rows
from peftkit.data.splits import (
    SPLITS,
    DataReport,
    DataSplits,
    build_datasets,
    check_sources,
    count_rows,
    load_split,
    read_train_samples,
)

__all__ = [
    "BUILTINS",
    "FORMAT_FIELDS",
    "IGNORE_INDEX",
    "READERS",
    "SPLITS",
    "BuiltinDataset",
    "DataConfig",
    "DataReport",
    "DataSplits",
    "Encoder",
    "Example",
    "Record",
    "Sample",
    "build_datasets",
    "check_sources",
    "count_rows",
    "detect_format",
    "load_split",
    "read_file",
    "read_rows",
    "read_train_samples",
    "register_builtin",
]
