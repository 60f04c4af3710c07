"""Localization of a non-finite step: replay it on the rank and name the first module, parameter and operation."""

from nanwatch.client.localize.capture import StepCapture
from nanwatch.client.localize.guard import replaying
from nanwatch.client.localize.replay import Localizer

__all__ = ["Localizer", "StepCapture", "replaying"]
