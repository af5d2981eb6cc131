"""Euphonium-Ray: online RL for text-to-video flow matching on Ray."""
__version__ = "0.1.0"
