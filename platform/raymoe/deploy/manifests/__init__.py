"""KubeRay manifests for the platform, rendered from one set of values.

`DeployValues` (values.py) holds every knob; one module per resource kind renders it
(raycluster, rayjob, schedule, rayservice, monitoring, security, namespace) with a comment above
each non-obvious field; `render_manifests(values)` gives every file under k8s/ (render.py), the
overlays as kustomize patches (presets.py, kustomize.py). `raymoe manifests render` writes them.
"""

from raymoe.deploy.manifests.render import render_manifests
from raymoe.deploy.manifests.values import DeployValues

__all__ = ["DeployValues", "render_manifests"]
