"""The classification family: sentences and pairs with a class or a number, scored by GLUE's metrics.

    FAMILY   prepare: `sources.read_classification` encoded as [CLS] a [SEP] (b [SEP]);
             score: accuracy, F1, Matthews (classes) or Pearson, Spearman (regression), and the loss

Sentences and pairs are read by `sources`; classes are scored as GLUE scores them.
"""

from bertjax.finetune import features, metrics, sources
from bertjax.finetune.family import Data, Family, mean_loss, no_train


def prepare(config, tokenizer, with_train: bool) -> Data:
  data = sources.read_classification(config, with_train)
  max_seq_len = config.finetune.max_seq_len
  encode = lambda examples: features.encode_classification(examples, tokenizer, max_seq_len)
  train = encode(data.train) if data.train is not None else no_train(max_seq_len)
  return Data(data.spec, tokenizer, train, {k: encode(v) for k, v in data.dev.items()})


def score(config, spec, dev, gold, outputs) -> tuple[dict[str, float], None]:
  if spec.regression:
    scores = metrics.regression(spec.metrics, outputs["logits"][:, 0], dev["labels"])
  else:
    scores = metrics.classification(spec.metrics, outputs["logits"].argmax(-1), dev["labels"])
  return {**scores, "loss": mean_loss(outputs)}, None


FAMILY = Family(prepare, score)
