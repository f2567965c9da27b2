"""Reward functions (rlhfx.reward_functions): the built-ins, TRL-style calls with dataset columns, None, weights,
and the prompt data's extra columns."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from rlhfx import reward_functions as R
from rlhfx import rollout, scoring, sharding
from rlhfx.config import ConfigError
from rlhfx.data import builders


def test_math_answer_compares_the_final_answer_with_the_gold_one():
  completions = ["<think>7+12</think><answer>19</answer>",  # inside the answer tags
                 "so the sum is \\boxed{19}",  # LaTeX box
                 "I think 19.0",  # the same number written otherwise
                 "<think>19</think><answer>20</answer>",  # the tags win over a right number elsewhere
                 [{"role": "assistant", "content": "<answer>-48</answer>"}],  # a conversational completion
                 "no number here",
                 "<answer>1/2</answer>"]
  answers = ["19", "19", "19", "19", "-48", "19", "0.5"]
  assert R.math_answer(completions, answer=answers) == [1.0, 1.0, 1.0, 0.0, 1.0, 0.0, 1.0]
  assert R.math_answer(["19"], answer=[""]) == [None]  # a gold answer that does not parse: not applicable


def test_format_rewards():
  assert R.think_format(["<think>a\nb</think>\n<answer>3</answer>", "<answer>3</answer>",
                         "<think>a</think><answer>3</answer> and more",
                         [{"role": "assistant", "content": " <think></think><answer>x</answer> "}]]) == [1, 0, 0, 1]
  fn = R.load_function("regex:[a-z ]+", tokenizer=None)
  assert fn(["hello world", "Hello", ""]) == [1.0, 0.0, 0.0]
  with pytest.raises(ConfigError, match=r"functions\[0\]='regex:\(': .*not a valid regular expression"):
    R.load(["regex:("], [], tokenizer=None)


def test_a_text_function_gets_the_arguments_it_names_and_the_columns():
  seen = {}

  def named(completions, answer):  # no **kwargs: only what it names
    seen["named"] = (completions, answer)
    return [1.0] * len(completions)

  def everything(prompts, **kwargs):  # **kwargs: every standard argument and column
    seen["everything"] = (prompts, kwargs)
    return [None, 2.0]

  inputs = dict(prompts=["p1", "p2"], completions=["c1", "c2"], completion_ids=[[5], [6, 7]],
                columns={"answer": ["1", "2"], "level": [3, 4]})
  np.testing.assert_array_equal(R.call(R.RewardFunction("named", named), **inputs), [1.0, 1.0])
  np.testing.assert_array_equal(R.call(R.RewardFunction("everything", everything), **inputs), [np.nan, 2.0])
  assert seen["named"] == (["c1", "c2"], ["1", "2"])
  assert seen["everything"] == (["p1", "p2"], {"completions": ["c1", "c2"], "completion_ids": [[5], [6, 7]],
                                                "answer": ["1", "2"], "level": [3, 4]})
  with pytest.raises(ValueError, match="returned 1 scores for 2 completions"):
    R.call(R.RewardFunction("short", lambda completions: [1.0]), **inputs)


def test_missing_columns_are_a_config_error_naming_the_function_and_column():
  functions = R.load(["math_answer", "think_format"], [], tokenizer=None)
  R.check_columns(functions, ["answer"], "data.jsonl")
  with pytest.raises(ConfigError, match="math_answer needs the column 'answer', which the prompt data \\(data.jsonl\\) "
                                        "does not have; its columns: \\['level', 'prompt'\\]"):
    R.check_columns(functions, ["level"], "data.jsonl")


def test_weighted_sum_skips_none_and_metrics_count_only_applicable_completions():
  functions = R.load(["math_answer", "think_format"], [1.0, 0.25], tokenizer=None)
  parts = {"math_answer": np.array([1.0, np.nan, 0.0, np.nan], np.float32),
           "think_format": np.array([1.0, 1.0, 0.0, 0.0], np.float32)}
  np.testing.assert_allclose(R.weighted_sum(parts, functions), [1.25, 0.25, 0.0, 0.0])
  m = {k: float(v) for k, v in R.metrics(parts).items()}
  assert m["rewards/math_answer/mean"] == pytest.approx(0.5)  # over the 2 completions it applied to
  assert m["rewards/math_answer/std"] == pytest.approx(0.5)
  assert m["rewards/math_answer/applicable"] == pytest.approx(0.5)
  assert m["rewards/think_format/mean"] == pytest.approx(0.5)
  none = R.metrics({"math_answer": np.full(3, np.nan, np.float32)})
  assert none["rewards/math_answer/mean"] == 0.0 and none["rewards/math_answer/applicable"] == 0.0  # never NaN
  jm = jax.jit(R.metrics)({k: jnp.asarray(v) for k, v in parts.items()})  # the same in the graph
  assert {k: float(v) for k, v in jm.items()} == pytest.approx(m)


def test_in_graph_scores_add_the_model_and_the_weighted_traceable_functions():
  count = R.on_tokens(lambda p, pm, t, m: m.sum(-1).astype(jnp.float32))
  const = R.on_tokens(lambda p, pm, t, m: jnp.full(t.shape[:1], 2.0))
  scorer = scoring.Scorer(functions=(R.RewardFunction("count", count, 0.5), R.RewardFunction("const", const, -1.0)))
  r = rollout.Rollout(prompt_BxP=jnp.ones((2, 1), jnp.int32), prompt_mask_BxP=jnp.ones((2, 1), bool),
                      tokens_BxC=jnp.ones((2, 3), jnp.int32), mask_BxC=jnp.array([[1, 1, 0], [1, 1, 1]], bool),
                      sample_logps_BxC=jnp.zeros((2, 3)))
  scores_B, parts = scoring.scores(r, None, scorer)
  np.testing.assert_allclose(scores_B, [0.5 * 2 - 2.0, 0.5 * 3 - 2.0])
  np.testing.assert_allclose(parts["count"], [2.0, 3.0])
  assert scorer.in_graph
  assert not scoring.Scorer(functions=R.load(["think_format"], [], None)).in_graph


def _prompt_source(tmp_path, records):
  (tmp_path / "prompts.jsonl").write_text("\n".join(json.dumps(r) for r in records) + "\n")
  builders.build("prompts", [tmp_path / "prompts.jsonl"], data_dir=tmp_path / "data", input_format="prompts")
  return builders.data_source(tmp_path / "data", "train")


def test_prompt_rows_keep_their_other_columns_for_reward_functions(tmp_path):
  messages = [{"role": "user", "content": "What is 2 + 2?"}]
  source = _prompt_source(tmp_path, [{"prompt": "What is 1 + 1?", "answer": "2", "meta": {"level": 1}},
                                     {"prompt": messages, "answer": "4", "meta": {"level": 2}}])
  rows = sorted((scoring.prompt_row(source, i) for i in range(len(source))), key=lambda row: row["columns"]["answer"])
  assert rows[0] == {"prompt": "What is 1 + 1?", "messages": [], "columns": {"answer": "2", "meta": {"level": 1}}}
  assert rows[1] == {"prompt": "", "messages": messages, "columns": {"answer": "4", "meta": {"level": 2}}}
  assert scoring.prompt_columns(source) == ["answer", "meta"]


def test_host_scoring_passes_each_completion_its_prompt_row(tmp_path):
  """Rows repeat per group; conversational prompts give message lists, as TRL passes them."""
  from rlhfx.data.synthetic import byte_tokenizer

  tokenizer = byte_tokenizer()
  messages = [{"role": "user", "content": "two"}]
  source = _prompt_source(tmp_path, [{"prompt": "one", "answer": "1"}, {"prompt": messages, "answer": "2"}])
  index = {scoring.prompt_row(source, i)["columns"]["answer"]: i for i in range(2)}
  calls = []

  def record(prompts, completions, answer):
    calls.append((prompts, completions, answer))
    return [float(a) for a in answer]

  ids = np.array([index["2"], index["1"]])  # two prompts, two samples each
  completion = np.array([[3 + ord(c) for c in "ab"]] * 4, np.int32)
  r = rollout.Rollout(prompt_BxP=np.zeros((4, 1), np.int32), prompt_mask_BxP=np.ones((4, 1), bool),
                      tokens_BxC=completion, mask_BxC=np.ones((4, 2), bool), sample_logps_BxC=np.zeros((4, 2)))
  scorer = scoring.Scorer(functions=(R.RewardFunction("record", record, 2.0),))
  mesh = sharding.make_mesh({"data": 1})
  scores_B, parts = scoring.score_on_host(scorer, tokenizer, r, mesh, in_graph=(np.full(4, 0.5, np.float32), {}),
                                          prompt_ids=ids, source=source)
  prompts, completions, answer = calls[0]
  assert answer == ["2", "2", "1", "1"]
  assert prompts == [messages, messages, "one", "one"]
  assert completions == [[{"role": "assistant", "content": "ab"}]] * 2 + ["ab"] * 2
  np.testing.assert_allclose(np.asarray(scores_B), [4.5, 4.5, 2.5, 2.5])  # 0.5 in the graph + 2 x answer
  np.testing.assert_allclose(parts["record"], [2, 2, 1, 1])
