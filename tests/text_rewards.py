"""A host (text) reward function for the GRPO test: called with decoded prompts and completions."""


def vowel_share(prompts: list[str], completions: list[str]) -> list[float]:
  """The share of a completion's characters that are lowercase vowels."""
  del prompts
  return [sum(ch in "aeiou" for ch in text) / max(len(text), 1) for text in completions]
