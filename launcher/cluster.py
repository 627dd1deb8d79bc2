"""Cluster profiles (``configs/clusters/*.yaml``, ``prune-ofa submit --cluster FILE``): a site's SLURM values
in one file, so a shipped pipeline runs there unchanged.

A pipeline says what each stage needs by naming a resource class (``slurm: {class: pretrain}``); the
profile says what that class is on this site (partition, GPUs per node, CPUs, memory, time limit, ...),
and adds what every job of the site needs::

    account: myproj
    scratch: /scratch/$USER/prune-ofa   # output_root and the prepared data go here, not into the repo
    hf_home: /scratch/$USER/hf-home     # exported as HF_HOME in every script
    offline: true                       # compute nodes without internet: HF_HUB_OFFLINE=1, ... in every script
    nccl: {NCCL_DEBUG: INFO}            # over NCCL_DEFAULTS, in GPU stages; null removes one
    classes:
      pretrain: {partition: gpu, nodes: 4, gpus_per_node: 8, partition_gpus: 8, time: "24:00:00"}
      task: {partition: gpu, gpus_per_node: 1, time: "24:00:00"}

A class takes the keys of a pipeline's ``slurm:`` section (:class:`launcher.pipeline.Resources`).
How the layers combine (later wins, ``env`` merged name by name) is
:func:`launcher.pipeline.stage_resources`. :func:`load_cluster` validates the whole file before anything
else and raises :class:`ClusterProfileError` naming the file and the dotted key.
"""
from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Annotated, Any, Optional

from pydantic import BeforeValidator, Field, PrivateAttr, field_validator

from launcher.pipeline import PipelineError, Resources, SlurmText, check_class_names, file_or_shipped
from sparse_pretrain.runtime.recipe_files import read_yaml_tree
from sparse_pretrain.runtime.schema import Flag, Section, Text, validated

#: shipped profiles: ``--cluster example`` is configs/clusters/example.yaml
CLUSTERS = Path(__file__).resolve().parent.parent / "configs" / "clusters"
#: the variable that names a profile when --cluster is not given
CLUSTER_VARIABLE = "PRUNE_OFA_CLUSTER"
#: exported in every script of a profile with ``offline: true`` (compute nodes without internet): the hub
#: client, datasets and transformers read only the cache (``hf_home``, filled on a login node)
OFFLINE_VARIABLES = {"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
#: exported in every GPU stage of a profile (slurm/README.md says what each does); the profile's ``nccl:``
#: changes them, a null value removes one
NCCL_DEFAULTS = {
    "TORCH_NCCL_ASYNC_ERROR_HANDLING": "1",   # an NCCL error or timeout aborts the communicator and ends the rank
    "NCCL_DEBUG": "WARN",                     # NCCL's warnings and errors (why a collective failed) in the log
}
VARIABLE_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
EnvValue = Text | int | float | bool


class ClusterProfileError(PipelineError):
    """A cluster profile is invalid; the message names the file and the dotted key."""


def _expanded_path(value: Any) -> Any:
    """``~`` and ``$VARIABLES`` expanded where the pipeline is submitted (the scripts hold the result);
    a variable that is not set is an error, not a literal ``$USER`` directory."""
    if not isinstance(value, str):
        return value
    text = os.path.expanduser(os.path.expandvars(value))
    unset = re.search(r"\$\{?([A-Za-z_][A-Za-z0-9_]*)", text)
    if unset:
        raise ValueError(f"{value!r}: ${unset.group(1)} is not set")
    if not text:
        raise ValueError("must be a directory, got ''")
    return Path(text).resolve()


SitePath = Annotated[Path, BeforeValidator(_expanded_path)]


class ClusterProfile(Section):
    """A cluster profile file as written (paths expanded and absolute)."""
    account: Optional[SlurmText] = None       # --account of every job (a class may set its own)
    classes: dict[Text, Resources] = {}       # resource class name -> its slurm keys on this site
    setup: Annotated[Optional[Text | list[Text]], Field(     # before every run (default: activate this venv)
        description="a shell line or a list of them")] = None
    env: Annotated[dict[Text, EnvValue], Field(description="a mapping NAME: value")] = {}
    scratch: Optional[SitePath] = None        # relative output_root and data.cache_dir resolve here
    hf_home: Optional[SitePath] = None        # HF_HOME of every job (the hub and datasets cache)
    offline: Flag = False                     # export OFFLINE_VARIABLES in every job
    nccl: Annotated[dict[Text, Optional[EnvValue]], Field(   # over NCCL_DEFAULTS; null removes a variable
        description="a mapping NAME: value (null removes a default)")] = {}
    _file: Optional[Path] = PrivateAttr(default=None)        # the file it was read from (load_cluster)

    @field_validator("classes")
    @classmethod
    def _class_names(cls, classes: dict) -> dict:
        return check_class_names(classes)

    @field_validator("env", "nccl")
    @classmethod
    def _variable_names(cls, env: dict) -> dict:
        for key in env:
            if not VARIABLE_NAME.fullmatch(key):
                raise ValueError(f"{key!r} is not a variable name")
        return env

    @property
    def path(self) -> Optional[Path]:
        return self._file

    def nccl_variables(self) -> dict[str, EnvValue]:
        """What a GPU stage exports: NCCL_DEFAULTS with the profile's ``nccl:`` over them."""
        merged = {**NCCL_DEFAULTS, **self.nccl}
        return {k: v for k, v in merged.items() if v is not None}

    def site_variables(self) -> dict[str, EnvValue]:
        """What every stage exports: HF_HOME, the offline variables, then the profile's ``env``."""
        env: dict[str, EnvValue] = {}
        if self.hf_home is not None:
            env["HF_HOME"] = str(self.hf_home)
        if self.offline:
            env.update(OFFLINE_VARIABLES)
        return {**env, **self.env}

    def site_defaults(self) -> dict[str, Any]:
        """The profile's keys for every stage, as a pipeline's ``slurm:`` section would write them."""
        out: dict[str, Any] = {"env": self.site_variables()}
        if self.account is not None:
            out["account"] = self.account
        if self.setup is not None:
            out["setup"] = self.setup
        return out

    def describe(self) -> str:
        """One line for ``submit --dry-run``: the file and what it sets for every job."""
        parts = [f"account {self.account}" if self.account else "no account",
                 f"scratch {self.scratch}" if self.scratch else "no scratch (output under the workdir)",
                 f"HF_HOME {self.hf_home}" if self.hf_home else "HF_HOME unset",
                 "offline" if self.offline else "online", f"classes {', '.join(self.classes) or 'none'}"]
        return f"cluster profile {self.path}: {'; '.join(parts)}"


def resolve_cluster_path(name_or_path: str | Path) -> Path:
    """A profile file, or the name of a shipped one (``example`` -> configs/clusters/example.yaml)."""
    return file_or_shipped(name_or_path, CLUSTERS, str(name_or_path), ClusterProfileError, "cluster profile", "shipped")


def cluster_argument(value: Optional[str], environ=None) -> Optional[str]:
    """``--cluster``'s value, else ``$PRUNE_OFA_CLUSTER`` (empty: none), else None."""
    environ = os.environ if environ is None else environ     # at call time: see sparse_pretrain.runtime.rendezvous
    return value or environ.get(CLUSTER_VARIABLE) or None


def load_cluster(path: str | Path) -> ClusterProfile:
    """Read and validate a cluster profile (a file, or a shipped profile's name); an error names the
    file and the dotted key."""
    file = resolve_cluster_path(path).resolve()
    raw = read_yaml_tree(file, ClusterProfileError, f"cluster profile {file}", "a mapping")
    try:
        profile = validated(ClusterProfile, raw, ClusterProfileError)
    except ClusterProfileError as err:
        raise ClusterProfileError(f"cluster profile {file}: {err}") from None
    profile._file = file
    return profile
