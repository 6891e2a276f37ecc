"""Fine-tuning configs: BERT's recipe for GLUE, custom classification and SQuAD."""
