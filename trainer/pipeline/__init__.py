"""`wellread pipeline`: a study (students x methods x seeds x label sizes) as a graph of stage commands.

study.py    the study recipe (what to compare)
graph.py    the graph of stage nodes and the one function that turns a node into a command
cache.py    keys, markers and output digests: what is finished, what must re-run and why
runner.py   runs the graph in order, with progress lines, resume and signal forwarding
execute.py  runs one node (the step executor the Slurm in-job runner shares)
select.py   the one node run in-process: the best learning rate per seed
report/     results.md / results.json / the figures from the finished runs, or from a results.json
"""
