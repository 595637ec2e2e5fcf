"""forgetless: fine-tune LLMs without catastrophic forgetting."""

from __future__ import annotations

import logging as _logging

__version__ = "0.1.0"

# bitsandbytes' CPU backend (on CPUs with AVX512-BF16, imported by peft) tries to fetch an optional kernel from
# the hub at import and warns when it cannot; the `kernels` package (a transformers dependency since 5.25) adds
# its own warning when the hub is offline. Both are expected offline, say nothing useful to our users, and came
# before our first line in every log. bitsandbytes then uses its built-in CPU path.
_logging.getLogger("bitsandbytes.backends.cpu.ops").setLevel(_logging.ERROR)


class _DropOfflineTrustNotice(_logging.Filter):
    def filter(self, record: _logging.LogRecord) -> bool:
        return not str(record.msg).startswith("Skipping publisher trust check")


_logging.getLogger("kernels._internals.hf_hub").addFilter(_DropOfflineTrustNotice())

__all__ = ["__version__"]
