"""Keeping transformers' own progress bars out of lmdp's output."""
import contextlib


@contextlib.contextmanager
def quiet_transformers():
    """No 'Loading weights' / 'Writing model shards' bars of transformers' own while this is active."""
    from transformers.utils import logging as hf_logging
    was_enabled = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if was_enabled:
            hf_logging.enable_progress_bar()
