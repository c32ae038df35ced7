"""Recipes: the typed YAML of every stage (torch-free, so the CLI, the preflight check, the pipeline graph
and the Slurm submitter can read a recipe without loading a model). `base` holds the sections every training
stage shares; one module per stage holds its own."""
