"""Silence megatron-core's import-time warnings about Transformer Engine and Apex.

Why: ``import megatron.core`` emits four UserWarnings ("Transformer Engine and Apex are not
installed. Falling back to ...") on every machine without them, i.e. every CPU run and every
process of every launch. We use neither (the local path is the default; FP8 imports Transformer
Engine itself, lazily, and reports clearly if it is missing), so the warnings only bury the
training log. Only these exact messages are filtered; nothing else is.
"""

import warnings

warnings.filterwarnings("ignore", message=r"Transformer Engine and Apex are not installed", category=UserWarning)
warnings.filterwarnings("ignore", message=r"Apex is not installed", category=UserWarning)
