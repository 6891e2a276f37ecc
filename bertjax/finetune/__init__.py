"""Fine-tuning: GLUE-style classification and regression, SQuAD extractive QA, the GLUE suite."""
