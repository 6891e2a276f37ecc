"""The BERT model: sizes and settings (`config`), building blocks (`layers`), the model (`bert`)."""
