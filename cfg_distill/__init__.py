"""cfg-distill core: DICE refiners and TeEFusion for one-pass guidance. Host-independent: imports
only torch, safetensors and numpy (never comfy or the webui's modules)."""
from .apply import ConditioningError, fuse_tokens, refine_ranges, refine_tokens
from .families import FAMILIES, describe_dim
from .fusion import fuse
from .refiner import PARAMETER_NAMES, DiceRefiner, refine
from .refiner_file import (LoadedRefiner, RefinerFileError, RefinerInfo, load_refiner,
                           read_refiner_info, save_refiner)

__all__ = [
    "ConditioningError", "DiceRefiner", "FAMILIES", "LoadedRefiner", "PARAMETER_NAMES",
    "RefinerFileError", "RefinerInfo", "describe_dim", "fuse", "fuse_tokens", "load_refiner",
    "read_refiner_info", "refine", "refine_ranges", "refine_tokens", "save_refiner",
]
__version__ = "0.1.0"

# DICE distillation loop (host-independent; the hosts' trainers call it)
from .training import (Batch, GapReport, TrainConfig, TrainingDiverged, TrainingState, TrainingStateError,
                       TrainResult, cfg_target, distill_loss, evaluate_gap, load_training_state, new_refiner,
                       save_training_state, train_refiner)
from .training import RefinerStudent, Student, StudentRun, save_student_state, train_student

__all__ += [
    "Batch", "GapReport", "TrainConfig", "TrainResult", "TrainingDiverged", "TrainingState",
    "TrainingStateError", "cfg_target", "distill_loss", "evaluate_gap",
    "load_training_state", "new_refiner", "save_training_state", "train_refiner",
    "RefinerStudent", "Student", "StudentRun", "save_student_state", "train_student",
]

# The one training request and the one run every front door uses
from .request import RequestError, TrainRequest
from .run import Outcome, Reporter, run
from .training import TrainingHooks

__all__ += ["RequestError", "TrainRequest", "Outcome", "Reporter", "run", "TrainingHooks"]
