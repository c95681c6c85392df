"""An in-test Kubernetes API server: a real HTTP server on 127.0.0.1 that the official
Python client and kubectl talk to, for the project's tests, its lab and its benchmarks.

    from kmesh_lab.apiserver import ApiServer

    with ApiServer(token="t", version=(1, 31), bookmark_interval=1.0) as server:
        server.write_kubeconfig(tmp_path / "kubeconfig")
        server.create({"apiVersion": "v1", "kind": "Node", "metadata": {"name": "n1"}})
        server.faults.compact()

Modules, one job each: ``resources`` (the table of kinds), ``store`` (collections,
resourceVersion, history, snapshots), ``registry`` (Kubernetes semantics of the verbs and
admission hooks), ``selectors``, ``patch``, ``watches`` (one watch stream), ``discovery``,
``faults``, ``errors`` (Status objects), ``protobuf`` (the bodies kubectl 1.32+ send that
way), ``tls`` (optional https) and ``server`` (HTTP and the public class).

kubectl needs ``--validate=false`` for ``apply`` and ``create -f``: ``/openapi/v2`` and
``/openapi/v3`` answer 404. kubectl sends a token only over https: with ``token=...`` use
``tls=True`` for kubectl (the Python client is fine either way). The product package
``kmesh_plugin`` never imports this.
"""

from .errors import ApiError
from .faults import Faults
from .registry import AdmissionHook
from .resources import DEFAULT_RESOURCES, MergeRule, ResourceTable, ResourceType
from .selectors import FieldSelector, LabelSelector, SelectorError
from .server import ApiServer, RequestRecord

__all__ = [
    "DEFAULT_RESOURCES",
    "AdmissionHook",
    "ApiError",
    "ApiServer",
    "Faults",
    "FieldSelector",
    "LabelSelector",
    "MergeRule",
    "RequestRecord",
    "ResourceTable",
    "ResourceType",
    "SelectorError",
]
