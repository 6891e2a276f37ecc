"""bertjax: BERT pretraining in JAX/Flax NNX, from one CPU to a TPU pod."""

__version__ = "0.1.0"
