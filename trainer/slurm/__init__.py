"""Slurm submission helpers behind slurm/*.sh (the sbatch scripts themselves live in slurm/).

    sbatch.py     read a script's #SBATCH defaults and sbatch options -> the resources; check, then submit
    pipeline.py   a study's graph (trainer/pipeline) as a chain of job arrays with afterok dependencies,
                  and the runner each of those jobs starts
    array.py      where a task stands in its job array (positions, not ids)
    __main__.py   `python -m trainer.slurm submit | pipeline | run-node | grid-task` (what the scripts call)
"""
