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
way), ``tls`` (optional https), ``remotecommand`` (``kubectl exec`` over WebSocket) and
``server`` (HTTP and the public class).

``tables`` prints what ``kubectl get`` shows; ``openapi`` serves ``/openapi/v3`` (and a
minimal v2) so ``apply`` and ``create -f`` work with kubectl's default validation. kubectl
sends a token only over https: with ``token=...`` use
``tls=True`` for kubectl (the Python client is fine either way). The product package
``kmesh_plugin`` never imports this.
"""

from .errors import ApiError
from .faults import Faults
from .registry import AdmissionHook
from .remotecommand import ExecRequest, ExecRunner
from .resources import DEFAULT_RESOURCES, MergeRule, ResourceTable, ResourceType
from .selectors import FieldSelector, LabelSelector, SelectorError
from .server import ApiServer, RequestRecord

__all__ = [
    "DEFAULT_RESOURCES",
    "AdmissionHook",
    "ApiError",
    "ApiServer",
    "ExecRequest",
    "ExecRunner",
    "Faults",
    "FieldSelector",
    "LabelSelector",
    "MergeRule",
    "RequestRecord",
    "ResourceTable",
    "ResourceType",
    "SelectorError",
]
