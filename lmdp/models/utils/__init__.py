"""Helpers model ports share (lmdeploy's `lmdeploy.pytorch.models.utils`)."""
