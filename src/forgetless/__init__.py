"""forgetless: fine-tune LLMs without catastrophic forgetting."""

from __future__ import annotations

import logging as _logging

__version__ = "0.1.0"

# bitsandbytes' CPU backend tries to fetch an optional kernel from the hub at import and warns when it
# cannot; that is expected offline and says nothing useful to our users.
_logging.getLogger("bitsandbytes.backends.cpu.ops").setLevel(_logging.ERROR)

__all__ = ["__version__"]
