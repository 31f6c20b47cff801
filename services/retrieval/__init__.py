"""Input-aware adapter retrieval: embed prompts, find the adapters whose card samples are closest.

Kept import-light (no torch) so that configuration code can read the defaults.
"""

DEFAULT_INSTRUCTION = "Represent the sentence for similar task retrieval: "
