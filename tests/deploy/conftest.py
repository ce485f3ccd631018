def pytest_configure(config):
    # Registered here because this directory owns the marker; CI runs these tests too (they are
    # slow, not optional): select with `-m packaging`, or leave out locally with `-m "not packaging"`.
    config.addinivalue_line("markers", "packaging: builds and installs the project like the container "
                                       "image does (needs PyPI access, ~1 min)")
