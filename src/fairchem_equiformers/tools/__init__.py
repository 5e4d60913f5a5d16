"""Tools apart from the models: the SLURM launcher, EvalAI submission files and the demo."""
