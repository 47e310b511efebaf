"""The training: the trainer and its epoch engine, the train state, optimizer and schedule, weight
averaging, the run's clock, the models, and where the arithmetic runs."""
