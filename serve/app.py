"""Ray Serve entry point of the janus-lab image server (`import_path: serve.app:build`).

    serve run serve/config.yaml
    serve run serve.app:build model=models:/janus-4o@champion   # without the config file

Everything lives in `janus_lab.serving`; this file only names the application builder.
"""

from janus_lab.serving import build_app as build

__all__ = ["build"]
