"""A small Kubernetes API client for the few objects tlsproxy manages itself.

``config.py`` finds the API server and the credentials (in-cluster service account, or a kubeconfig);
``client.py`` makes requests (get, update, patch, watch) with a timeout each, and turns every failure
into one :class:`~tlsproxy.k8s.client.APIError` with a log line and a metric; ``watch.py`` follows
one object (get, then watch with bookmarks, resume from the last resourceVersion, relist on 410
Gone, back off when the API server is away); ``secrets.py`` provisions a certificate into a Secret
and serves it (the decisions are the pure ``certs/provision.py``); ``cabundle.py`` keeps a
MutatingWebhookConfiguration's ``caBundle`` equal to a Secret's ``ca.crt``.

The unit sits above ``certs`` and below ``tls``/``inbound``/``outbound``/``webhook``/``app``: it knows
certificate material, never TLS contexts or listeners.
"""
