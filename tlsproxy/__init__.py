"""tlsproxy: a TLS 1.3 sidecar for plain-HTTP apps.

Vocabulary used across the package:

- *inbound*: TLS from clients is terminated on ``--listen`` and requests go to the local app (``--upstream``).
- *outbound*: the app calls a plain local listener and tlsproxy originates TLS to a peer.
- *bundle*: one immutable certificate + key (+ CA) read from disk (``certs/``).
- *context store*: the current ``ssl.SSLContext`` generation; every accept asks it for the context
  to use, so a reload is one reference swap (``tls/store.py``).
- *forward engine*: the one HTTP/1.1 request-forwarding loop (``http/forward.py``) both directions use.
"""

__version__ = "0.1.0"
