"""Stage loops (Stage I SFT, Stage II/III Flow-DPO) over a host-neutral `Denoiser`."""

from .data import (MARGIN_USES, DataError, MarginPlan, PreferencePair, PreferenceSet, VideoSample, VideoSet,
                   describe_skips, nonfinite_group, nonfinite_parts, plan_margins)
from .denoiser import Conditioning, Denoiser, X0Denoiser, velocity_from_x0
from .stages import (STAGE_TRAINS, STAGES, StageTrainer, TrainConfig, TrainingError, TrainResult, plottable_losses,
                     record_stage, stage_entry, train_dpo, train_sft)
from .validation import margin_summary, preference_margins

__all__ = ["Conditioning", "Denoiser", "X0Denoiser", "velocity_from_x0", "VideoSample", "VideoSet",
           "PreferencePair", "PreferenceSet", "DataError", "TrainConfig", "TrainResult", "TrainingError",
           "StageTrainer", "STAGES", "STAGE_TRAINS", "train_sft", "train_dpo", "record_stage", "stage_entry",
           "plottable_losses", "nonfinite_parts", "nonfinite_group", "describe_skips",
           "MARGIN_USES", "MarginPlan", "plan_margins", "preference_margins", "margin_summary"]
