"""A host (text) reward function for the GRPO test: called with decoded prompts and completions."""


def vowel_share(prompts: list[str], completions: list[str]) -> list[float]:
  """The share of a completion's characters that are lowercase vowels."""
  del prompts
  return [sum(ch in "aeiou" for ch in text) / max(len(text), 1) for text in completions]


def checked_answer(prompts: list[str], completions: list[str], answer: list[str], **kwargs) -> list[float | None]:
  """For the arithmetic task: each completion's `answer` column must be its own prompt's sum or difference (a
  misaligned column fails the run); the score is the share of completion characters that are digits, and None
  (not applicable) for negative answers."""
  del kwargs
  scores = []
  for prompt, completion, gold in zip(prompts, completions, answer):
    a, op, b = prompt.removeprefix("What is ").split("?")[0].split()
    assert int(gold) == (int(a) + int(b) if op == "+" else int(a) - int(b)), (prompt, gold)
    scores.append(None if int(gold) < 0 else sum(ch.isdigit() for ch in completion) / max(len(completion), 1))
  return scores
