"""Every limit on what one input may ask to be held in memory, in one place.

Readers look these up at call time (``limits.MAX_TENSORS``), so a test or an
embedding application can lower one by setting the module attribute.
"""

from __future__ import annotations

MAX_ST_HEADER = 100 * 1024 * 1024  # safetensors header bytes (the reference implementation's limit)
MAX_TENSORS = 1_000_000  # tensors in one file (a 70B model has ~1,000; large MoE checkpoints ~100,000)
MAX_TOTAL_TENSORS = 2_000_000  # tensors in all the files of one call, and names in an index's weight_map
MAX_METADATA_KEYS = 65_536  # keys in a safetensors __metadata__ object
MAX_METADATA_VALUE = 1 << 20  # characters in one __metadata__ key or value
MAX_INDEX_BYTES = 64 << 20  # size of a *.safetensors.index.json
MAX_USIZE = (1 << 64) - 1  # safetensors shapes and offsets are u64; so is a tensor's element count
MAX_NPY_HEADER = 1 << 16  # bytes of one .npy header
MAX_ZIP_CD = 256 << 20  # a zip central directory (its entries take at least 46 bytes: millions of members fit)
MAX_DCP_METADATA = 256 << 20  # bytes of a distributed checkpoint's pickled .metadata
MAX_DCP_OPEN = 64  # files of a distributed checkpoint held open; with more, each read opens the ones it needs
MAX_DCP_RUNS = 1 << 22  # contiguous pieces a distributed checkpoint's chunks cut its tensors into (column shards: rows)
MAX_PICKLE = 256 << 20  # bytes of one pickle (a torch file's data.pkl, a DCP .metadata)
MAX_PICKLE_DEPTH = 256  # tuples nested in tuples; containers nested in containers (walked)
MAX_PICKLE_WEIGHT = 1 << 24  # elements of one pickled tuple, counted through nested tuples with repetitions
