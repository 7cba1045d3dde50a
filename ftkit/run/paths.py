"""The layout of a run directory: what `ftkit train` and `ftkit rl` write and what `eval`, `generate`, `export` and
`push` read. `RunPaths` is the one place that names these files and folders; everything else asks it.

runs/NAME/
  recipe.yaml                     the resolved recipe (overrides applied)
  adapter_config.json             the final PEFT adapter (standard format)
  adapter_model.safetensors
  config.json, model.safetensors  instead of the adapter with train.trainable=full: the full model
  tokenizer*.json                 the tokenizer used
  base/                           presets (tiny, small) only: the random-init base weights
  checkpoints/checkpoint-N/       Trainer checkpoints (weights, optimizer, RNG, state, manifest.json), written
                                  atomically through checkpoints/.staging/
  checkpoints/damaged-checkpoint-N/  a checkpoint `--resume` found damaged, moved aside (never deleted)
  .ftkit.lock                     the one-writer lock (ftkit.run.lock)
  train_log.jsonl                 one JSON object per logging step
  noise_loss.jsonl                (noise level t, canvas loss) per training example
  loss.png, noise_loss.png        plots
  versions.json, summary.json     library versions; loss before/after, speed, parameter counts
  eval.json, eval_*.json          written by `ftkit eval` (eval.json: the recipe's own evaluation)
  hub_upload/                     written by `ftkit push --dry-run`
An `ftkit rl` run adds:
  reference_adapter/              the init_from run's adapter, copied at the start: the KL anchor and resume point
  rl_eval_before.json             the held-out evaluation of the starting policy, written before step 1
  rl_eval.json                    before and after side by side, written when the run completes
  reward.png                      the reward curve
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar


@dataclass(frozen=True)
class RunPaths:
    """Every file and folder of the run directory `root`. The class attributes are the names (relative to the run
    directory, or to a checkpoint folder for the checkpoint's own files); the properties are the paths."""

    root: Path

    # What any training command writes
    RECIPE: ClassVar[str] = "recipe.yaml"
    VERSIONS: ClassVar[str] = "versions.json"  # written first: it marks a directory as a run (rundir.foreign_entries)
    SUMMARY: ClassVar[str] = "summary.json"
    TRAIN_LOG: ClassVar[str] = "train_log.jsonl"
    NOISE_LOG: ClassVar[str] = "noise_loss.jsonl"
    LOSS_PLOT: ClassVar[str] = "loss.png"
    NOISE_PLOT: ClassVar[str] = "noise_loss.png"
    BASE: ClassVar[str] = "base"  # a preset's random-init base weights
    LOCK: ClassVar[str] = ".ftkit.lock"
    TOKENIZER_REQUIRED: ClassVar[tuple[str, ...]] = ("tokenizer_config.json", "tokenizer.json")
    TOKENIZER_OPTIONAL: ClassVar[tuple[str, ...]] = (
        "special_tokens_map.json",
        "added_tokens.json",
        "tokenizer.model",
        "chat_template.jinja",
        "chat_template.json",
    )

    # The trained weights: an adapter, or with train.trainable=full a full model (as save_pretrained writes it)
    ADAPTER_CONFIG: ClassVar[str] = "adapter_config.json"
    ADAPTER_WEIGHTS: ClassVar[str] = "adapter_model.safetensors"
    FULL_CONFIG: ClassVar[str] = "config.json"
    FULL_WEIGHTS: ClassVar[str] = "model.safetensors"  # one shard; a sharded model's first shard stands for all
    GENERATION_CONFIG: ClassVar[str] = "generation_config.json"
    WEIGHTS_STAGING: ClassVar[str] = ".staging-adapter"  # save_pretrained writes here before the files move up

    # Checkpoints, and the files of one checkpoint folder
    CHECKPOINTS: ClassVar[str] = "checkpoints"
    CHECKPOINT_STAGING: ClassVar[str] = ".staging"  # inside checkpoints/: a checkpoint being written
    DAMAGED_PREFIX: ClassVar[str] = "damaged-"
    MANIFEST: ClassVar[str] = "manifest.json"
    TRAINER_STATE: ClassVar[tuple[str, ...]] = ("trainer_state.json", "optimizer.pt", "scheduler.pt")

    # What other commands write
    EVAL: ClassVar[str] = "eval.json"  # `ftkit eval`'s canonical result: the recipe's own evaluation
    EVAL_GLOB: ClassVar[str] = "eval*.json"  # every evaluation (eval.json, eval_base.json, ...)
    HUB_UPLOAD: ClassVar[str] = "hub_upload"  # `ftkit push --dry-run`

    # What `ftkit rl` adds
    REFERENCE: ClassVar[str] = "reference_adapter"
    RL_EVAL_BEFORE: ClassVar[str] = "rl_eval_before.json"
    RL_EVAL: ClassVar[str] = "rl_eval.json"
    REWARD_PLOT: ClassVar[str] = "reward.png"

    def __post_init__(self) -> None:
        object.__setattr__(self, "root", Path(self.root))

    @staticmethod
    def staging(name: str) -> str:
        """The name a folder `name` is written under before it is renamed into place."""
        return f".staging-{name}"

    @classmethod
    def adapter_files(cls) -> tuple[str, ...]:
        return (cls.ADAPTER_CONFIG, cls.ADAPTER_WEIGHTS)

    @classmethod
    def full_model_files(cls) -> tuple[str, ...]:
        return (cls.FULL_CONFIG, cls.FULL_WEIGHTS)

    @classmethod
    def weight_files(cls, full: bool) -> tuple[str, ...]:
        """The files that hold what a run trained: its adapter, or with train.trainable=full its full model."""
        return cls.full_model_files() if full else cls.adapter_files()

    @classmethod
    def weights_file(cls, full: bool) -> str:
        """The file that holds what a run trained (a sharded full model: its first shard's name stands for all)."""
        return cls.FULL_WEIGHTS if full else cls.ADAPTER_WEIGHTS

    @classmethod
    def saved_model_files(cls, folder: Path, full: bool) -> list[str]:
        """What save_pretrained wrote into `folder` that a run keeps, weights first (so they are in place before the
        config that names them): the adapter's two files, or a full model's safetensors (sharded or not, with its
        index), generation config and config."""
        if not full:
            return [cls.ADAPTER_WEIGHTS, cls.ADAPTER_CONFIG]
        weights = sorted(
            p.name
            for p in folder.glob("model*")
            if p.is_file() and p.name.endswith((".safetensors", ".safetensors.index.json"))
        )
        return [*weights, *(n for n in (cls.GENERATION_CONFIG, cls.FULL_CONFIG) if (folder / n).is_file())]

    @classmethod
    def tokenizer_files(cls) -> tuple[str, ...]:
        return (*cls.TOKENIZER_REQUIRED, *cls.TOKENIZER_OPTIONAL)

    @classmethod
    def attempt_files(cls) -> tuple[str, ...]:
        """What `ftkit train` writes before it has anything worth keeping: an attempt that died before its first
        checkpoint leaves only these, and the next attempt may clear them (ftkit.run.start)."""
        return (
            cls.RECIPE,
            cls.VERSIONS,
            cls.TRAIN_LOG,
            cls.NOISE_LOG,
            cls.LOSS_PLOT,
            cls.NOISE_PLOT,
            cls.WEIGHTS_STAGING,
            cls.BASE,
            *cls.tokenizer_files(),
            f"{cls.CHECKPOINTS}/{cls.CHECKPOINT_STAGING}",
        )

    @classmethod
    def rl_attempt_files(cls) -> tuple[str, ...]:
        """What an `ftkit rl` attempt writes before its first checkpoint, besides train's files."""
        return (cls.REFERENCE, cls.staging(cls.REFERENCE), cls.staging(cls.BASE), cls.RL_EVAL_BEFORE, cls.REWARD_PLOT)

    # -- paths
    def __truediv__(self, name: str) -> Path:
        return self.root / name

    @property
    def recipe(self) -> Path:
        return self.root / self.RECIPE

    @property
    def versions(self) -> Path:
        return self.root / self.VERSIONS

    @property
    def summary(self) -> Path:
        return self.root / self.SUMMARY

    @property
    def train_log(self) -> Path:
        return self.root / self.TRAIN_LOG

    @property
    def noise_log(self) -> Path:
        return self.root / self.NOISE_LOG

    @property
    def loss_plot(self) -> Path:
        return self.root / self.LOSS_PLOT

    @property
    def noise_plot(self) -> Path:
        return self.root / self.NOISE_PLOT

    @property
    def base(self) -> Path:
        return self.root / self.BASE

    @property
    def lock(self) -> Path:
        return self.root / self.LOCK

    @property
    def weights_staging(self) -> Path:
        return self.root / self.WEIGHTS_STAGING

    @property
    def checkpoints(self) -> Path:
        return self.root / self.CHECKPOINTS

    @property
    def eval(self) -> Path:
        return self.root / self.EVAL

    @property
    def hub_upload(self) -> Path:
        return self.root / self.HUB_UPLOAD

    @property
    def reference(self) -> Path:
        return self.root / self.REFERENCE

    @property
    def rl_eval_before(self) -> Path:
        return self.root / self.RL_EVAL_BEFORE

    @property
    def rl_eval(self) -> Path:
        return self.root / self.RL_EVAL

    @property
    def reward_plot(self) -> Path:
        return self.root / self.REWARD_PLOT


# What summary.json says an `ftkit rl` run is: the RL command writes it, `ftkit push` tells an RL run by it (its card
# describes the RL stage).
RL_STAGE = "rl"


def is_rl_summary(summary: dict) -> bool:
    """Whether a run's summary.json is an `ftkit rl` run's."""
    return summary.get("stage") == RL_STAGE
