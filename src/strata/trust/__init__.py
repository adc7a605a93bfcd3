"""Trust between tiers: the fleet CA and node certificates, keys made on nodes, encryption at rest, attestation.

Modules here that need `cryptography` are never imported by the long-running agent (it must stay small): the
agent runs them as short-lived child processes (`python -m strata.trust.node`).
"""
