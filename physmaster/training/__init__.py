"""Stage loops (Stage I SFT, Stage II/III Flow-DPO) over a host-neutral `Denoiser`."""

from .data import DataError, PreferencePair, PreferenceSet, VideoSample, VideoSet
from .denoiser import Conditioning, Denoiser, X0Denoiser, velocity_from_x0
from .stages import (STAGES, StageTrainer, TrainConfig, TrainingError, TrainResult, record_stage, train_dpo,
                     train_sft)

__all__ = ["Conditioning", "Denoiser", "X0Denoiser", "velocity_from_x0", "VideoSample", "VideoSet",
           "PreferencePair", "PreferenceSet", "DataError", "TrainConfig", "TrainResult", "TrainingError",
           "StageTrainer", "STAGES", "train_sft", "train_dpo", "record_stage"]
