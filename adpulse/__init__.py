"""adpulse: streaming engine for real-time ad delivery."""

__version__ = "0.1.0"
