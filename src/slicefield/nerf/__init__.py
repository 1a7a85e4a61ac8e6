"""Generative radiance field across subjects (GRAF / MedNeRF line): train on views of many subjects, reconstruct
a subject from a single view. :mod:`.model` holds the networks and the renderer, :mod:`.train` the data, training
and single-view fitting, :mod:`.pipeline` the folder-level steps the CLI runs."""

from .model import PRESETS, NerfConfig
from .train import GenerativeModel, SingleViewConfig, load_model, save_model

__all__ = ["PRESETS", "GenerativeModel", "NerfConfig", "SingleViewConfig", "load_model", "save_model"]
