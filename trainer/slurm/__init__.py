"""Slurm submission helpers behind slurm/*.sh (the sbatch scripts themselves live in slurm/).

sbatch.py     read a script's #SBATCH defaults and sbatch options -> the resources; check, then submit
pipeline.py   the submitting side: a study's graph (trainer/pipeline) as a chain of job arrays with afterok
              dependencies, each group checked before sbatch
plan.py       the plan file between the two sides (groups, node records)
job.py        the in-job side: one array task runs its node through trainer/pipeline/execute.py
__main__.py   `python -m trainer.slurm submit | pipeline | run-node | grid-task` (what the scripts call)
"""
