"""Adapters for diffusers and DiffSynth-Studio users."""
