"""Operations: metrics, decision log, health endpoints."""
