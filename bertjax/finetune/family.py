"""What a family of fine-tuning tasks gives a run: its data read and tokenised, its dev outputs scored.

    Data     a task's data, tokenised: train and dev features, and what scoring needs beyond them
    Family   prepare(config, tokenizer, with_train) -> Data
             score(config, spec, features, gold, outputs) -> (metrics, extras or None)

Each family (classification, QA, NER, multiple choice) is one module that defines a `FAMILY`;
`bertjax.finetune.run` looks it up by `finetune.task` and is otherwise the same for all of them.
The device side of a family (its head, its losses, its eval outputs) is `heads` and `task`.
"""

import dataclasses
from collections.abc import Callable
from typing import Any

import numpy as np

from bertjax import tasks


@dataclasses.dataclass
class Data:
  """A task's data, tokenised: train and dev features, and what the dev metrics need."""

  spec: tasks.TaskSpec  # with what the data named (an hf: dataset's classes, a train file's tags)
  tokenizer: Any
  train: dict[str, np.ndarray]
  dev: dict[str, dict[str, np.ndarray]]  # dev split -> features
  gold: dict[str, Any] = dataclasses.field(default_factory=dict)  # dev split -> what `score` reads

  @property
  def questions(self) -> dict[str, Any]:
    """QA's gold: dev split -> its `squad.Question`s."""
    return self.gold


def no_train(max_seq_len: int) -> dict[str, np.ndarray]:
  """The train features of a run that reads only its dev splits (`bertjax eval`)."""
  return {"input_ids": np.zeros((0, max_seq_len), np.int32)}


@dataclasses.dataclass(frozen=True)
class Family:
  """How a family's data becomes features, and its dev outputs metrics.

  prepare(config, tokenizer, with_train) -> Data: read and tokenise the train split (unless not
    `with_train`) and the dev splits; a bad input is a BertjaxError naming the file and line.
  score(config, spec, features, gold, outputs) -> (metrics, extras): one dev split's metrics from
    the eval step's per-row `outputs` (padding rows dropped) and summed losses; `extras` is what
    the run writes beside its results (QA's answers), or None.
  """

  prepare: Callable[..., Data]
  score: Callable[..., tuple[dict[str, float], dict | None]]


def mean_loss(outputs: dict) -> float:
  """The dev loss from the eval step's summed `loss_sum` and `weight_sum`."""
  return outputs["loss_sum"] / max(outputs["weight_sum"], 1.0)
