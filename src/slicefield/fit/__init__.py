"""Fitting a representation to stacks through the acquisition physics."""

from .engine import FitConfig, FitResult, fit_field, load_model, sample_model

__all__ = ["FitConfig", "FitResult", "fit_field", "load_model", "sample_model"]
