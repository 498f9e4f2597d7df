"""The trainable / frozen partition lives in `jaxtune.utils.partition` (the PEFT methods below the
training layer use it too); this name is kept for code written against it."""

from jaxtune.utils.partition import any_mask, count, join, mask_by_regex, never_trainable, param_count, split

__all__ = ["any_mask", "count", "join", "mask_by_regex", "never_trainable", "param_count", "split"]
