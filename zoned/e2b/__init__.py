"""An E2B-compatible endpoint: unmodified ``e2b`` programs run in zones (docs/e2b.md).

=====================================  ==========================================
:mod:`zoned.e2b.connectrpc`            the Connect protocol (JSON): envelopes,
                                       end-of-stream, error codes (pure)
:mod:`zoned.e2b.envd`                  envd's messages and their translation to
                                       zoned's: users, paths, commands (pure)
:mod:`zoned.e2b.api`                   the control-plane REST API: bodies in,
                                       sandbox JSON out, sandbox records (pure)
:mod:`zoned.e2b.processes`             processes that outlive a request, fanned
                                       out to the streams of them
:mod:`zoned.e2b.service`               the HTTP shell: authentication, routing,
                                       deadlines, the daemon's own connections
=====================================  ==========================================
"""
