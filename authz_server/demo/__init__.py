"""A loopback Istio look-alike built from real Envoy processes.

The local mesh demo and the end-to-end tests share this kit, so that what the demo shows is what the
tests prove: a test CA and SPIFFE workload certificates made at run time (:mod:`.pki`), Envoy
bootstrap configs for the roles Istio's proxies play (:mod:`.envoy_config`), process supervision
(:mod:`.processes`), a header-echoing upstream app (:mod:`.upstream`), an HTTP(S) client
(:mod:`.client`) and the wiring of a whole mesh around one authz server (:mod:`.topology`).
"""
