"""The matching engine: policies compiled into request tests, scoping, the decision."""
