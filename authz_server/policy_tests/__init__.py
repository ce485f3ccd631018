"""Policy tests and impact diffs: decide described requests offline, as the server would.

``authz-server test`` runs YAML test files (:mod:`.suite`) against their policy set and compares
each verdict with what the test expects (:mod:`.expectations`); ``authz-server diff`` decides the
same requests under two policy sets (:mod:`.diff`). Both decide through :mod:`.offline`, the
same App, adapter, JWT layer and engine a live Check goes through.
"""
