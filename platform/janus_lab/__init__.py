"""janus-lab: fine-tune Janus-Pro into a Janus-4o-style image generator and editor, on Ray."""

__version__ = "0.1.0"
