"""Sizes the input pipeline's rows obey, in a leaf that the config checks read without the pipeline."""

MIN_PAIR_TOKENS = 5  # [CLS] a [SEP] b [SEP]: the fewest tokens a sentence pair takes in a row
