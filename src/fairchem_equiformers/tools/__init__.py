"""Tools apart from the models: the SLURM launcher, EvalAI submission files, the demo, and the
memory allocator switch."""
