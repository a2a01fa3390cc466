"""Scripts that generate the published files under docs/ (conformance vectors, parity ledger)."""
