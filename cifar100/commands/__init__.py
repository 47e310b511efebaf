"""The commands users run beside training: eval, report (and its W&B Report), sweep and bench."""
