"""Constants shared by the checks: refusal phrases, thresholds, removal reasons."""

from __future__ import annotations

import re

#: Case-insensitive phrases that mark an answer as refusal / assistant boilerplate (apostrophes normalised).
REFUSAL_PHRASES: tuple[str, ...] = (
    "as an ai language model",
    "as a language model",
    "as an ai assistant, i cannot",
    "as an ai, i cannot",
    "i'm sorry, but i cannot",
    "i'm sorry, but i can't",
    "i am sorry, but i cannot",
    "i'm sorry, i cannot",
    "i cannot fulfill that request",
    "i cannot fulfill this request",
    "i can't assist with that",
    "i cannot assist with that",
    "i'm unable to help with that",
    "i am not able to provide",
)
#: Two answers to the same prompt are "materially different" when their normalised texts differ and the
#: Jaccard similarity of their word sets is below this.
ANSWER_JACCARD_DIFFERENT = 0.5
#: Prompts count as near-duplicates for contradictions at Jaccard >= max(threshold, this): one changed word in a
#: short prompt ("how many apples ..." / "how many pears ...") usually asks a different question.
PROMPT_MIN_JACCARD = 0.9
#: Eval items shorter than the n-gram size take part whole when they have at least this many words.
MIN_SHORT_ITEM_WORDS = 8
#: Removal reasons, in priority order (a record flagged twice is logged under the first).
REASONS = ("malformed_json", "schema", "contaminated", "empty_prompt", "empty", "whitespace",
           "repeated_token", "repeated_char", "refusal", "exact_duplicate", "near_duplicate")
DEGENERATE_REASONS = ("empty_prompt", "empty", "whitespace", "repeated_token", "repeated_char", "refusal")

WORD = re.compile(r"\w+")
APOSTROPHES = str.maketrans({"\u2019": "'", "\u2018": "'", "\u02bc": "'"})


# ---------------------------------------------------------------- reading
