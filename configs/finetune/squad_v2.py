"""Fine-tuning on SQuAD 2.0 (unanswerable questions): squad.py's settings at lr 5e-5, with the
no-answer score compared to the best span's (finetune.null_score_threshold, 0 by default; the
paper tunes it on the dev set).

    bertjax finetune --task qa --config configs/finetune/squad_v2.py --init runs/base \
        --workdir runs/squad2 --config.finetune.train_file=train-v2.0.json \
        --config.finetune.dev_file=dev-v2.0.json

(or --config.finetune.data=hf:rajpurkar/squad_v2, online).
"""

from configs.finetune import squad


def get_config(arg: str | None = None):
  c = squad.get_config(arg, default_lr=5e-5)
  c.finetune.squad_v2 = True
  return c
