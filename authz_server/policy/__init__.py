"""Istio policy documents: loading, validation and the parsed model."""
