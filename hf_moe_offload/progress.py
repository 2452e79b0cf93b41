"""Progress bars for long one-off work (filling, writing, verifying a store), silenced by the switches HF users
already know: `transformers.utils.logging.disable_progress_bar()`, `huggingface_hub`'s
`disable_progress_bars()` / `HF_HUB_DISABLE_PROGRESS_BARS=1`, and tqdm's own `TQDM_DISABLE=1`."""

from __future__ import annotations

import os

from tqdm.auto import tqdm


def progress_enabled() -> bool:
    """Whether transformers, huggingface_hub and tqdm all let progress bars show."""
    from huggingface_hub.utils import are_progress_bars_disabled
    from transformers.utils import logging

    if not logging.is_progress_bar_enabled() or are_progress_bars_disabled():
        return False
    return os.environ.get("TQDM_DISABLE", "").strip().lower() not in ("1", "true", "yes", "on")


def progress_bar(*, enabled: bool = True, **kwargs) -> tqdm:
    """A `tqdm` bar, shown only when `enabled` and `progress_enabled()`."""
    return tqdm(disable=not (enabled and progress_enabled()), **kwargs)
