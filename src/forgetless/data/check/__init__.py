"""SFT data checks: schema, duplicates, near-duplicates, contradictions, length, degenerate answers,
benchmark contamination and a diversity profile, plus `fix_data` that writes a cleaned copy.

Every record is parsed with the same code training uses (`data/examples.py`), so a record that passes
here is a record `forgetless train` accepts. Nothing stops at the first bad record: every problem is
reported with the file:line it came from. See docs/data-check.md for the definitions and the JSON layout.
"""

from __future__ import annotations

from .against import AGAINST_SOURCES, load_against, resolve_against, suite_against
from .common import DEGENERATE_REASONS, REASONS, REFUSAL_PHRASES
from .fix import FixResult, fix_data, removed_log_path
from .near_dup import lsh_params, minhash_signatures, near_duplicate_clusters
from .report import CheckReport
from .run import cheap_checks, check_data, counted, report_problems
from .text import degenerate_reason, normalize, words

__all__ = ["AGAINST_SOURCES", "DEGENERATE_REASONS", "REASONS", "REFUSAL_PHRASES", "CheckReport", "FixResult",
           "cheap_checks", "check_data", "counted", "degenerate_reason", "fix_data", "load_against", "lsh_params",
           "minhash_signatures", "near_duplicate_clusters", "normalize", "removed_log_path", "report_problems",
           "resolve_against", "suite_against", "words"]
