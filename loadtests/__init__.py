"""Load tests (Locust) and the side-by-side benchmark (``python -m loadtests.bench``)."""
