"""Named-entity recognition (CoNLL-2003) with BERT's recipe: batch 32, 3 epochs, 128 tokens, AdamW,
10% warmup; a tag for each word's first sub-token, scored by conlleval's entity F1.

    bertjax finetune --task ner --config configs/finetune/ner.py --init runs/base \
        --workdir runs/conll --config.finetune.train_file=eng.train \
        --config.finetune.dev_file=eng.testa

Files are CoNLL-2003's columns (eng.train, eng.testa: a token per line, the tag last) or .jsonl
rows of tokens and tags. The paper gives its fine-tuning grid (appendix A.3: lr 5e-5, 3e-5, 2e-5;
batch 16 or 32; 2-4 epochs), not its pick for CoNLL; `lr=` sets the learning rate, and left out
the --init model's width decides (2e-5 for BERT-base and large, as GLUE). The tags are the train
file's unless finetune.labels lists them; the model learns them in IOB2 (finetune.tag_scheme).
"""

from configs.finetune import recipe


def get_config(arg: str | None = None):
  c = recipe.recipe(recipe.config_args(arg, lr=recipe.BY_MODEL_SIZE).lr)
  c.finetune.task = "ner"
  c.finetune.tag_scheme = "iob2"
  return c
