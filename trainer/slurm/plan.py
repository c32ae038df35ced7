"""The plan file between the two sides of a study on Slurm: trainer/slurm/pipeline.py writes it, every job's
`python -m trainer.slurm run-node PLAN GROUP` (trainer/slurm/job.py) reads it.

    STUDY_OUT_DIR/slurm/plan-STAMP-PID.json
        recipe, overrides, out_dir, cwd      the study as submitted (the job runs in cwd)
        label_shards, preprocess_tasks       the array sizes of the shard groups
        nodes    {id: node record}           the nodes to run (node_record / node_from)
        deps_done {id: out_dir}              finished inputs of those nodes (their markers hold the digests)
        groups   [Group as a dict]           the job arrays in submission order, with their job ids
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from trainer import registry
from trainer.pipeline.graph import Node

# graph node kind -> the sbatch script whose #SBATCH defaults its job takes
SCRIPTS = registry.SCRIPTS
STAGE_MODES = ("run", "shards", "parts")  # the task runs (its share of) the stage: it starts the node
FINISH_MODES = ("run", "finalize", "merge")  # the task's success finishes the node: it writes the marker


@dataclass
class Group:
    """One job array: `nodes[i]` runs in array task i (a shard group runs one node in every task)."""

    kind: str  # a node kind, or label shards / finalize, preprocess parts / merge, report
    nodes: list[str]
    deps: list[int] = field(default_factory=list)  # indices of the groups it waits for
    tasks: int = 1
    mode: str = "run"  # run | shards | finalize | parts | merge | report
    job: str | None = None

    @property
    def script(self) -> str:
        if self.kind in SCRIPTS and self.mode in STAGE_MODES:
            return SCRIPTS[self.kind]
        return "wellread.sbatch"


def node_record(node: Node) -> dict[str, Any]:
    d = asdict(node)
    d["out_dir"] = str(node.out_dir)
    d["inputs"] = [str(p) for p in node.inputs]
    return d


def node_from(record: dict[str, Any]) -> Node:
    return Node(**{**record, "out_dir": Path(record["out_dir"]), "inputs": [Path(p) for p in record["inputs"]]})
