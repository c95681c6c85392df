"""An optional TLS server context with a throwaway self-signed certificate for 127.0.0.1.

Why TLS at all: kubectl (client-go's clientcmd) reads a kubeconfig's credentials only when
the server URL is https ("only try to read the auth information if we are secure"), so
over plain http it never sends the bearer token and a server with a token answers 401.
The certificate is made by the ``openssl`` command (Debian's openssl package), once per
server, with an EC P-256 key, valid for two days, for IP 127.0.0.1; it exists only in
memory and in the kubeconfig (``certificate-authority-data``) afterwards.
"""

from __future__ import annotations

import shutil
import ssl
import subprocess
import tempfile
from pathlib import Path


def self_signed_context() -> tuple[ssl.SSLContext, bytes]:
    """A server SSLContext and the PEM certificate a client should trust."""
    openssl = shutil.which("openssl")
    if openssl is None:
        raise RuntimeError("tls=True needs the openssl command (apt-get install openssl)")
    with tempfile.TemporaryDirectory(prefix="kmesh-lab-apiserver-") as tmp:
        key, cert = Path(tmp, "key.pem"), Path(tmp, "cert.pem")
        subprocess.run(
            [openssl, "req", "-x509", "-newkey", "ec", "-pkeyopt",
             "ec_paramgen_curve:prime256v1", "-nodes", "-days", "2",
             "-subj", "/CN=kmesh-lab-apiserver", "-addext", "subjectAltName=IP:127.0.0.1",
             "-keyout", str(key), "-out", str(cert)],
            check=True, capture_output=True, timeout=60,
        )
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        context.minimum_version = ssl.TLSVersion.TLSv1_2
        context.set_alpn_protocols(["http/1.1"])  # never h2: this server speaks HTTP/1.1
        context.load_cert_chain(cert, key)
        return context, cert.read_bytes()
