"""Teacher soft labels on disk: format (the layout), writer, finalizer, reader (SoftLabelStore), analysis."""

from trainer.data.softlabels.analysis import topk_kl_to_full
from trainer.data.softlabels.finalizer import finalize
from trainer.data.softlabels.format import (
    FORMAT_NAME,
    KIND_ROLES,
    KINDS,
    MANIFEST,
    ORDER_FILE,
    ROLES,
    VERSION,
    Kind,
    Role,
    labeled_roles,
    make_writer_id,
    part_stem,
)
from trainer.data.softlabels.reader import SoftLabelStore
from trainer.data.softlabels.writer import SoftLabelWriter, finished_parts

__all__ = [
    "FORMAT_NAME",
    "KIND_ROLES",
    "KINDS",
    "MANIFEST",
    "ORDER_FILE",
    "ROLES",
    "VERSION",
    "Kind",
    "Role",
    "SoftLabelStore",
    "SoftLabelWriter",
    "finalize",
    "finished_parts",
    "labeled_roles",
    "make_writer_id",
    "part_stem",
    "topk_kl_to_full",
]
