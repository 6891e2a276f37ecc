"""Performance tools: the train-step benchmark, kernel profiles, and the dry run that plans a run."""
