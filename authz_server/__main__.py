"""``python -m authz_server`` is the ``authz-server`` command."""

from authz_server.cli import main

raise SystemExit(main())
